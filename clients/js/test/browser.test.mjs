// The demo page in a real browser: two contexts as two users editing one shared list.
//
// Needs: a `tandem` binary that embeds the demo (`cargo build -p tandem-server`), Debian's
// `chromium` (`apt-get install -y chromium`; or set CHROMIUM_PATH), and `playwright-core`
// (a dev dependency). The server runs with --dev so the page can mint tokens at /dev/token.
// Screenshots go to clients/js/test-artifacts/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, until, mintToken, uniqueName } from './helpers.mjs';

const artifacts = join(dirname(fileURLToPath(import.meta.url)), '..', 'test-artifacts');

function chromiumPath() {
  if (process.env.CHROMIUM_PATH) return process.env.CHROMIUM_PATH;
  for (const name of ['chromium', 'chromium-browser']) {
    try {
      return execFileSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' }).trim();
    } catch {
      // try the next name
    }
  }
  throw new Error('chromium not found: `apt-get install -y chromium`, or set CHROMIUM_PATH');
}

let server;
let browser;
before(async () => {
  server = await startServer({ dev: true });
});
after(async () => {
  await browser?.close();
  await server?.close();
});

/** The list as a page shows it: [text, done] per item, in order. */
const items = (page) => page.$$eval('#items li', (lis) => lis.map((li) => [li.dataset.text, li.dataset.done]));

async function add(page, text) {
  await page.fill('#new-item', text);
  await page.press('#new-item', 'Enter');
}

test('two users edit a shared list live, offline and back, and converge', async (t) => {
  const probe = await fetch(`${server.httpUrl}/dev/token?sub=probe`);
  if (probe.status === 404) {
    t.skip('GET /dev/token answers 404: this tandem binary does not serve the demo in dev mode yet (wire /dev/token and rebuild)');
    return;
  }
  const demo = await fetch(`${server.httpUrl}/demo/app.js`).then((r) => r.text());
  assert.ok(demo.includes('/sdk/tandem.js'), 'the binary embeds the demo: rebuild with `cargo build -p tandem-server` after changing it');
  mkdirSync(artifacts, { recursive: true });

  browser = await chromium.launch({
    executablePath: chromiumPath(),
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const ctxA = await browser.newContext({ viewport: { width: 640, height: 720 } });
  const ctxB = await browser.newContext({ viewport: { width: 640, height: 720 } });
  const pageA = await ctxA.newPage();
  const pageB = await ctxB.newPage();
  for (const [who, page] of [['alice', pageA], ['bob', pageB]]) {
    page.on('pageerror', (e) => t.diagnostic(`${who} page error: ${e.message}`));
    page.on('console', (m) => m.type() === 'error' && t.diagnostic(`${who} console: ${m.text()}`));
  }
  const board = `${server.httpUrl}/?board=alice/groceries&user=`;

  // Alice opens her list and shares it with Bob; Bob opens it.
  await pageA.goto(board + 'alice');
  await pageA.waitForSelector('#conn[data-state="online"]');
  await pageA.waitForSelector('#list:not([hidden])');
  await pageA.fill('#share-with', 'bob');
  await pageA.press('#share-with', 'Enter');
  await pageA.waitForSelector('#log li:has-text("shared with bob")');
  await pageB.goto(board + 'bob');
  await pageB.waitForSelector('#conn[data-state="online"]');
  await pageB.waitForSelector('#list:not([hidden])');

  // Live: an edit in one appears in the other within a second, both ways.
  let t0 = Date.now();
  await add(pageA, 'milk');
  await pageB.waitForSelector('#items li[data-text="milk"]', { timeout: 1000 });
  t.diagnostic(`alice → bob: ${Date.now() - t0} ms`);
  t0 = Date.now();
  await add(pageB, 'bread');
  await pageA.waitForSelector('#items li[data-text="bread"]', { timeout: 1000 });
  t.diagnostic(`bob → alice: ${Date.now() - t0} ms`);
  t0 = Date.now();
  await pageA.check('#items li[data-text="bread"] input[type=checkbox]');
  await pageB.waitForSelector('#items li[data-text="bread"][data-done="true"]', { timeout: 1000 });
  t.diagnostic(`alice's toggle → bob: ${Date.now() - t0} ms`);

  // Bob goes offline and edits; Alice edits the same item meanwhile.
  await ctxB.setOffline(true);
  await pageB.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await pageA.check('#items li[data-text="milk"] input[type=checkbox]');
  await pageA.waitForSelector('#pending[data-count="0"]');
  await add(pageA, 'tea');
  await pageA.waitForSelector('#pending[data-count="0"]');
  await new Promise((r) => setTimeout(r, 50)); // Bob's edit is the newer one
  const milkB = pageB.locator('#items li[data-text="milk"] input.text');
  await milkB.fill('oat milk');
  await milkB.press('Enter');
  await add(pageB, 'eggs');
  await pageB.waitForSelector('#pending[data-count="2"]');
  await pageB.waitForSelector('#items li[data-text="eggs"].dirty');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(await pageA.locator('#items li[data-text="eggs"]').count(), 0, "Bob's offline edit has not reached Alice");
  assert.equal(await pageB.locator('#items li[data-text="tea"]').count(), 0, "Alice's edit has not reached offline Bob");
  await pageB.screenshot({ path: join(artifacts, 'bob-offline.png'), fullPage: true });

  // Bob comes back: his edits are sent, the conflict on milk is resolved visibly (his edit
  // is the newest), and both views converge.
  await ctxB.setOffline(false);
  await pageB.waitForSelector('#conn[data-state="online"]', { timeout: 10_000 });
  await pageB.waitForSelector('#pending[data-count="0"]', { timeout: 5000 });
  const notice = await pageB.waitForSelector('#log li.conflict', { timeout: 5000 });
  assert.match(await notice.textContent(), /conflict on 'oat milk': kept the newest edit \(yours\)/);
  const want = [
    ['oat milk', 'false'],
    ['bread', 'true'],
    ['tea', 'false'],
    ['eggs', 'false'],
  ];
  await until(async () => JSON.stringify(await items(pageA)) === JSON.stringify(want), 5000, 'alice to converge');
  await until(async () => JSON.stringify(await items(pageB)) === JSON.stringify(want), 5000, 'bob to converge');
  await pageA.waitForSelector('#pending[data-count="0"]');

  await pageA.screenshot({ path: join(artifacts, 'alice.png'), fullPage: true });
  await pageB.screenshot({ path: join(artifacts, 'bob.png'), fullPage: true });
  t.diagnostic(`screenshots in ${artifacts}`);
});

test('two tabs of one user: an offline edit in one shows in the other and is synced by it', async (t) => {
  const probe = await fetch(`${server.httpUrl}/dev/token?sub=probe`);
  if (probe.status === 404) {
    t.skip('GET /dev/token answers 404: this tandem binary does not serve the demo in dev mode');
    return;
  }
  mkdirSync(artifacts, { recursive: true });
  browser ??= await chromium.launch({
    executablePath: chromiumPath(),
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  // One context = one browser profile: the tabs share IndexedDB and BroadcastChannel.
  const ctx = await browser.newContext({ viewport: { width: 640, height: 720 } });
  const board = `${server.httpUrl}/?board=carol/tabs-${Date.now()}&user=carol`;
  const [tab1, tab2] = [await ctx.newPage(), await ctx.newPage()];
  for (const [who, page] of [['tab 1', tab1], ['tab 2', tab2]]) {
    page.on('pageerror', (e) => t.diagnostic(`${who} page error: ${e.message}`));
    await page.goto(board);
    await page.waitForSelector('#conn[data-state="online"]');
    await page.waitForSelector('#list:not([hidden])');
  }
  await ctx.setOffline(true);
  await tab1.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await tab2.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await add(tab1, 'written in tab 1');
  await tab1.waitForSelector('#pending[data-count="1"]');
  // The other tab shows it at once, pending there too, though neither tab is online.
  await tab2.waitForSelector('#items li[data-text="written in tab 1"]', { timeout: 1000 });
  await tab2.waitForSelector('#pending[data-count="1"]');
  await tab2.screenshot({ path: join(artifacts, 'tab2-offline.png'), fullPage: true });
  // The tab that made the edit goes away before it could sync; the other one sends it.
  await tab1.close();
  await ctx.setOffline(false);
  await tab2.waitForSelector('#conn[data-state="online"]', { timeout: 10_000 });
  await tab2.waitForSelector('#pending[data-count="0"]', { timeout: 5000 });
  // A fresh profile (no shared cache) sees it from the server.
  const other = await browser.newContext();
  const check = await other.newPage();
  await check.goto(board);
  await check.waitForSelector('#items li[data-text="written in tab 1"]', { timeout: 5000 });
  await Promise.all([ctx.close(), other.close()]);
});

test('offline, deleting a pending item makes it disappear at once (scenario S1.2)', async (t) => {
  const probe = await fetch(`${server.httpUrl}/dev/token?sub=probe`);
  if (probe.status === 404) {
    t.skip('GET /dev/token answers 404: this tandem binary does not serve the demo in dev mode');
    return;
  }
  mkdirSync(artifacts, { recursive: true });
  browser ??= await chromium.launch({
    executablePath: chromiumPath(),
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const ctx = await browser.newContext({ viewport: { width: 640, height: 720 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => t.diagnostic(`page error: ${e.message}`));
  const board = `${server.httpUrl}/?board=dave/offline-delete-${Date.now()}&user=dave`;
  await page.goto(board);
  await page.waitForSelector('#conn[data-state="online"]');
  await page.waitForSelector('#list:not([hidden])');
  await add(page, 'synced item');
  await page.waitForSelector('#pending[data-count="0"]');

  await ctx.setOffline(true);
  await page.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await add(page, 'typo');
  await page.waitForSelector('#items li[data-text="typo"].dirty');
  await page.waitForSelector('#pending[data-count="1"]');
  // Editing the pending item (still one pending change) shows at once...
  const text = page.locator('#items li[data-text="typo"] input.text');
  await text.fill('fixed typo');
  await text.press('Enter');
  await page.waitForSelector('#items li[data-text="fixed typo"].dirty', { timeout: 1000 });
  // ...and so does deleting it: gone from the list without waiting for the network.
  await page.click('#items li[data-text="fixed typo"] button.delete');
  await page.waitForSelector('#items li[data-text="fixed typo"]', { state: 'detached', timeout: 1000 });
  assert.deepEqual(await items(page), [['synced item', 'false']]);
  await page.screenshot({ path: join(artifacts, 'offline-delete.png'), fullPage: true });

  // Back online the removal is sent and nothing comes back.
  await ctx.setOffline(false);
  await page.waitForSelector('#conn[data-state="online"]', { timeout: 10_000 });
  await page.waitForSelector('#pending[data-count="0"]', { timeout: 5000 });
  assert.deepEqual(await items(page), [['synced item', 'false']]);
  await ctx.close();
});

test('without dev mode the demo says where tokens come from', async (t) => {
  const plain = await startServer();
  try {
    const probe = await fetch(`${plain.httpUrl}/dev/token?sub=alice`);
    assert.equal(probe.status, 404, 'no token minting outside dev mode');
    const page = await (browser ??= await chromium.launch({
      executablePath: chromiumPath(),
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    })).newPage();
    await page.goto(`${plain.httpUrl}/`);
    await page.waitForSelector('#chooser:not([hidden])');
    await page.goto(`${plain.httpUrl}/?user=alice`);
    const message = await page.waitForSelector('#message:not([hidden])');
    assert.match(await message.textContent(), /dev mode.*your app's own auth/s);
    assert.equal(await page.getAttribute('#conn', 'data-state'), 'failed');
    await page.close();
  } finally {
    await plain.close();
  }
});

/** The shared browser, launched on first use. */
async function launched() {
  browser ??= await chromium.launch({
    executablePath: chromiumPath(),
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  return browser;
}

/** What the page's IndexedDB cache holds for `user`, read with the SDK the server serves. */
const cachedFor = (page, user) =>
  page.evaluate(async (u) => {
    const { IndexedDBStore } = await import('/sdk/tandem.js');
    return (await new IndexedDBStore().list(u)).map((r) => `${r.owner}/${r.name}`);
  }, user);

test('sign-out with a pending write warns and keeps it; once synced, sign-out empties the cache', async (t) => {
  mkdirSync(artifacts, { recursive: true });
  const ctx = await (await launched()).newContext({ viewport: { width: 640, height: 720 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => t.diagnostic(`page error: ${e.message}`));
  const list = `signout-${Date.now()}`;
  await page.goto(`${server.httpUrl}/?board=erin/${list}&user=erin`);
  await page.waitForSelector('#conn[data-state="online"]');
  await page.waitForSelector('#list:not([hidden])');
  await add(page, 'synced item');
  await page.waitForSelector('#pending[data-count="0"]');

  await ctx.setOffline(true);
  await page.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await add(page, 'unsynced item');
  await page.waitForSelector('#pending[data-count="1"]');
  await page.click('#signout');
  const warning = await page.waitForSelector('#signout-warning:not([hidden])', { timeout: 2000 });
  assert.match(await warning.textContent(), new RegExp(`1 change is not synced yet \\(erin/${list}\\).*deletes it from this device`));
  await page.screenshot({ path: join(artifacts, 'signout-warning.png'), fullPage: true });
  // Nothing was deleted: the list and the cache are still there.
  assert.deepEqual(await cachedFor(page, 'erin'), [`erin/${list}`]);
  await page.click('#signout-cancel');
  await page.waitForSelector('#signout-warning', { state: 'hidden' });
  assert.deepEqual(await items(page), [
    ['synced item', 'false'],
    ['unsynced item', 'false'],
  ]);

  // The warning again, then the device comes back: it goes once the change is synced.
  await page.click('#signout');
  await page.waitForSelector('#signout-warning:not([hidden])');
  await ctx.setOffline(false);
  await page.waitForSelector('#pending[data-count="0"]', { timeout: 10_000 });
  await page.waitForSelector('#signout-warning', { state: 'hidden', timeout: 2000 });
  await page.click('#signout');
  await page.waitForSelector('#message:has-text("Signed out")', { timeout: 2000 });
  assert.deepEqual(await cachedFor(page, 'erin'), [], "erin's cache is gone from this profile");
  await page.screenshot({ path: join(artifacts, 'signed-out.png'), fullPage: true });
  t.diagnostic(`screenshots signout-warning.png, signed-out.png in ${artifacts}`);

  // A forced sign-out loses the pending write, as the warning says.
  const page2 = await ctx.newPage();
  await page2.goto(`${server.httpUrl}/?board=frank/${list}&user=frank`);
  await page2.waitForSelector('#list:not([hidden])');
  await page2.waitForSelector('#conn[data-state="online"]');
  await ctx.setOffline(true);
  await page2.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await add(page2, 'lost on purpose');
  await page2.waitForSelector('#pending[data-count="1"]');
  await page2.click('#signout');
  await page2.click('#signout-force');
  await page2.waitForSelector('#message:has-text("Signed out")', { timeout: 2000 });
  assert.deepEqual(await cachedFor(page2, 'frank'), []);
  await ctx.setOffline(false);
  // The server never got it.
  const check = await (await launched()).newContext();
  const p3 = await check.newPage();
  await p3.goto(`${server.httpUrl}/?board=frank/${list}&user=frank`);
  await p3.waitForSelector('#conn[data-state="online"]');
  await p3.waitForSelector('#synced:not([data-synced-at=""])');
  assert.deepEqual(await items(p3), []);
  await Promise.all([ctx.close(), check.close()]);
});

test('the sync-status pill follows lastSyncedAt', async (t) => {
  mkdirSync(artifacts, { recursive: true });
  const ctx = await (await launched()).newContext({ viewport: { width: 640, height: 720 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => t.diagnostic(`page error: ${e.message}`));
  await page.goto(`${server.httpUrl}/?board=gina/status-${Date.now()}&user=gina`);
  await page.waitForSelector('#list:not([hidden])');
  const pill = async () => ({
    at: await page.getAttribute('#synced', 'data-synced-at'),
    text: await page.textContent('#synced'),
    status: await page.evaluate(() => window.tandem.client.status.lastSyncedAt),
  });
  await page.waitForSelector('#synced:not([data-synced-at=""])', { timeout: 5000 });
  await add(page, 'first');
  await page.waitForSelector('#pending[data-count="0"]');
  await until(async () => (await pill()).at === String((await pill()).status), 2000, 'the pill to show the status');
  const first = await pill();
  const firstAt = Number(first.at);
  assert.ok(firstAt > 0);
  assert.equal(first.text, `synced ${await page.evaluate((ms) => new Date(ms).toLocaleTimeString(), firstAt)}`);

  // Offline: a write does not move it.
  await ctx.setOffline(true);
  await page.waitForSelector('#conn[data-state="offline"]', { timeout: 5000 });
  await page.waitForTimeout(1100); // so that the next sync shows a later time of day
  await add(page, 'second');
  await page.waitForSelector('#pending[data-count="1"]');
  assert.equal((await pill()).at, first.at, 'unchanged while offline');
  await page.screenshot({ path: join(artifacts, 'status-pill-offline.png'), fullPage: true });

  // Back online: the write is acknowledged and the pill moves on to the new lastSyncedAt.
  await ctx.setOffline(false);
  await page.waitForSelector('#pending[data-count="0"]', { timeout: 10_000 });
  await until(async () => Number((await pill()).at) > firstAt, 2000, 'the pill to move on');
  const later = await pill();
  assert.equal(later.at, String(later.status), 'the pill shows client.status.lastSyncedAt');
  assert.notEqual(later.text, first.text);
  await page.screenshot({ path: join(artifacts, 'status-pill.png'), fullPage: true });
  t.diagnostic(`pill: ${first.text} → ${later.text}; screenshots status-pill-offline.png, status-pill.png in ${artifacts}`);
  await ctx.close();
});

test('IndexedDBStore lists and removes by identity; wipe() in the browser', async () => {
  const ctx = await (await launched()).newContext();
  const page = await ctx.newPage();
  await page.goto(`${server.httpUrl}/demo/index.html`);
  const out = await page.evaluate(async () => {
    const { IndexedDBStore, TandemClient } = await import('/sdk/tandem.js');
    const store = new IndexedDBStore({ name: 'store-test' });
    const state = { syncCount: 1, records: { k: { value: 'v', syncCount: 1, dirty: true, version: 1 } } };
    await store.save({ identity: 'alice', owner: 'alice', name: 'a' }, state);
    await store.save({ identity: 'alice', owner: 'bob', name: 'shared' }, state);
    await store.save({ identity: 'alice2', owner: 'alice2', name: 'a' }, state);
    await store.save({ identity: 'bob', owner: 'bob', name: 'shared' }, state);
    const names = async (id) => (await store.list(id)).map((r) => `${r.owner}/${r.name}`).sort();
    const listed = { alice: await names('alice'), bob: await names('bob') };
    await store.remove({ identity: 'alice', owner: 'bob', name: 'shared' });
    const afterRemove = await names('alice');
    // A client over this store, started with the network refused: wipe needs no server.
    const client = TandemClient.connect('ws://127.0.0.1:9/v1/sync', 'token', { identity: 'alice', store, watchNetwork: false });
    let refused = null;
    try {
      await client.wipe();
    } catch (e) {
      refused = e.code;
    }
    const removed = (await client.wipe({ force: true })).map((r) => `${r.owner}/${r.name}`);
    return { listed, afterRemove, refused, removed, alice: await names('alice'), alice2: await names('alice2'), bob: await names('bob'), state: client.state };
  });
  assert.deepEqual(out.listed, { alice: ['alice/a', 'bob/shared'], bob: ['bob/shared'] });
  assert.deepEqual(out.afterRemove, ['alice/a']);
  assert.equal(out.refused, 'pending_writes');
  assert.deepEqual(out.removed, ['alice/a']);
  assert.deepEqual(out.alice, []);
  assert.deepEqual(out.alice2, ['alice2/a'], 'a prefix of the identity is another identity');
  assert.deepEqual(out.bob, ['bob/shared']);
  assert.equal(out.state, 'closed');
  await ctx.close();
});

test('IndexedDBStore keeps record metadata: a reopen from the cache shows who wrote what, from which device', async () => {
  const ctx = await (await launched()).newContext();
  const page = await ctx.newPage();
  await page.goto(`${server.httpUrl}/demo/index.html`);
  const out = await page.evaluate(
    async ({ token, name }) => {
      const { IndexedDBStore, TandemClient } = await import('/sdk/tandem.js');
      const store = new IndexedDBStore({ name: 'metadata-test' });
      const url = `${location.origin.replace(/^http/, 'ws')}/v1/sync`;
      const pick = (r) => ({ value: r.value, dirty: r.dirty, lastModified: r.lastModified ?? null, lastModifiedBy: r.lastModifiedBy ?? null, deviceId: r.deviceId ?? null });
      const c = TandemClient.connect(url, token, { identity: 'alice', deviceId: 'browser', store, crossTab: false, watchNetwork: false });
      await c.waitOnline(5000);
      const ds = await c.open(name);
      await ds.put('k', 'v');
      const local = pick(ds.record('k'));
      await c.flush({ timeoutMs: 5000 });
      const acked = pick(ds.record('k'));
      await ds.put('pending', 'p');
      const pending = pick(ds.record('pending'));
      await c.close();
      // The same store after a restart, with no server to reach.
      const off = TandemClient.connect('ws://127.0.0.1:9/v1/sync', 'unused', { identity: 'alice', deviceId: 'browser-2', store, crossTab: false, watchNetwork: false });
      const again = await off.open(name);
      const reopened = { k: pick(again.record('k')), pending: pick(again.record('pending')) };
      await off.close();
      return { local, acked, pending, reopened };
    },
    { token: mintToken('alice'), name: uniqueName() },
  );
  assert.deepEqual(out.local, { value: 'v', dirty: true, lastModified: null, lastModifiedBy: 'alice', deviceId: 'browser' });
  assert.equal(out.acked.dirty, false);
  assert.equal(typeof out.acked.lastModified, 'number', 'stamped by the server');
  assert.equal(out.acked.deviceId, 'browser');
  assert.deepEqual(out.reopened, { k: out.acked, pending: out.pending });
  assert.deepEqual(out.pending, { value: 'p', dirty: true, lastModified: null, lastModifiedBy: 'alice', deviceId: 'browser' });
  await ctx.close();
});
