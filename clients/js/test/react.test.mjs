// The React hooks (`@tandem/client/react`) with real React and react-dom rendering into a
// jsdom document, against a real server: nothing about React or the SDK is mocked.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { JSDOM } from 'jsdom';
import { startServer, onlineClient, controlledClient, until, uniqueName, sleep } from './helpers.mjs';

// react-dom needs a document (and `window`) before it is imported.
const dom = new JSDOM('<!doctype html><html><body></body></html>', { url: 'http://localhost/' });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.HTMLElement = dom.window.HTMLElement;
if (!globalThis.navigator) globalThis.navigator = dom.window.navigator;
const React = await import('react');
const { createRoot } = await import('react-dom/client');
// Through the package's exports map, as an app imports it.
const { useDataset, useRecord, useSyncStatus } = await import('@tandem/client/react');
const h = React.createElement;

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

function mount(element) {
  const container = document.createElement('div');
  document.body.append(container);
  const root = createRoot(container);
  root.render(element);
  return {
    container,
    text: (sel) => container.querySelector(sel)?.textContent,
    attr: (sel, name) => container.querySelector(sel)?.getAttribute(name),
    unmount: () => {
      root.unmount();
      container.remove();
    },
  };
}

test('useDataset and useRecord show local and remote changes; useSyncStatus follows the client', async () => {
  const name = uniqueName();
  const ctl = controlledClient(server, 'alice');
  const c = ctl.client;
  await c.waitOnline(5000);
  const renders = { title: 0, loading: 0 };

  // Memoised: it renders again only for its own reasons (its record), not its parent's.
  const Title = React.memo(function Title({ dataset }) {
    const title = useRecord(dataset, 'title');
    renders.title++;
    return h('h1', { id: 'title' }, title ?? '(none)');
  });
  function App() {
    const { dataset, snapshot, loading } = useDataset(c, name);
    const status = useSyncStatus(c);
    // Counted, not only looked for in the DOM: the open may end before a poll sees it.
    if (loading) renders.loading++;
    return h(
      'div',
      null,
      h('p', { id: 'status', 'data-connected': String(status.connected), 'data-pending': String(status.pending), 'data-synced-at': String(status.lastSyncedAt) }),
      loading ? h('p', { id: 'loading' }, 'loading') : null,
      h(Title, { dataset }),
      h('ul', { id: 'items' }, snapshot ? [...snapshot.records].map(([k, v]) => h('li', { key: k }, `${k}=${v}`)) : null),
    );
  }
  const view = mount(h(App));
  await until(() => renders.loading > 0, 5000, 'the first render, loading');
  await until(() => view.container.querySelector('#loading') === null, 5000, 'the dataset to open');
  assert.equal(view.attr('#status', 'data-connected'), 'true');
  await until(() => view.attr('#status', 'data-synced-at') !== 'null', 2000, 'the subscription in lastSyncedAt');

  // A local write shows at once, pending; the ack clears it.
  const ds = c.datasets.find((d) => d.name === name);
  await ds.put('title', 'Groceries');
  await until(() => view.text('#title') === 'Groceries', 2000, 'the local write to render');
  await until(() => view.attr('#status', 'data-pending') === '1', 2000, 'pending in the status');
  await ds.sync();
  await until(() => view.attr('#status', 'data-pending') === '0', 2000, 'the ack in the status');
  assert.notEqual(view.attr('#status', 'data-synced-at'), 'null');

  // Another device's change arrives live.
  const other = await onlineClient(server, 'alice');
  const od = await other.open(name);
  await od.put('milk', '1');
  await od.sync();
  await until(() => view.text('#items') === 'milk=1title=Groceries', 5000, 'the remote change to render');

  // useRecord renders again only when its own record changes.
  const before = renders.title;
  await od.put('eggs', '12');
  await od.sync();
  await until(() => view.text('#items').includes('eggs=12'), 5000, 'eggs');
  await sleep(50);
  assert.equal(renders.title, before, 'a change of another key does not render the title again');
  await od.put('title', 'Shopping');
  await od.sync();
  await until(() => view.text('#title') === 'Shopping', 5000, 'the remote title');

  // Offline: the status says so, and a local edit still renders at once.
  ctl.cut();
  await until(() => view.attr('#status', 'data-connected') === 'false', 5000, 'offline in the status');
  await ds.remove('milk');
  await until(() => !view.text('#items').includes('milk'), 2000, 'the removal to render');
  view.unmount();
  await Promise.all([c.close(), other.close()]);
});

test('useDataset reports a refused open and switches datasets when the name changes', async () => {
  const c = await onlineClient(server, 'bob');
  const owner = await onlineClient(server, 'alice');
  const [n1, n2] = [uniqueName(), uniqueName()];
  const d1 = await owner.open(n1);
  await d1.put('k', 'one');
  await d1.sync();
  const d2 = await owner.open(n2);
  await d2.put('k', 'two');
  await d2.sync();
  await owner.grant(n1, 'bob', 'read');

  let setName;
  function App() {
    const [name, set] = React.useState(n1);
    setName = set;
    const { dataset, error } = useDataset(c, name, { owner: 'alice' });
    const k = useRecord(dataset, 'k');
    return h('p', { id: 'out' }, error ? `error:${error.code}` : (k ?? '…'));
  }
  // StrictMode runs the effects twice: the second open() gets the same handle.
  const view = mount(h(React.StrictMode, null, h(App)));
  await until(() => view.text('#out') === 'one', 5000, 'the shared dataset');
  setName(n2); // not shared with bob
  await until(() => view.text('#out') === 'error:forbidden', 5000, 'the refusal');
  view.unmount();
  await Promise.all([c.close(), owner.close()]);
});

test('after a wipe (sign-out) the hooks stop showing the old records', async () => {
  const name = uniqueName();
  const c = await onlineClient(server, 'carol');
  const ds = await c.open(name);
  await ds.put('secret', 'x');
  await ds.sync();
  function App() {
    const { snapshot, error } = useDataset(c, name);
    const secret = useRecord(snapshot ? ds : null, 'secret');
    return h(
      'div',
      null,
      h('p', { id: 'error' }, error ? error.code : ''),
      h('ul', { id: 'items' }, snapshot ? [...snapshot.records].map(([k, v]) => h('li', { key: k }, `${k}=${v}`)) : null),
      h('p', { id: 'secret' }, secret ?? '(none)'),
    );
  }
  const view = mount(h(App));
  await until(() => view.text('#items') === 'secret=x', 5000, 'the record to render');
  await c.wipe();
  await until(() => view.text('#items') === '', 5000, 'the records to go at sign-out');
  await until(() => view.text('#error') === 'closed', 5000, 'the closed client as the error');
  assert.equal(view.text('#secret'), '(none)');
  view.unmount();
});
