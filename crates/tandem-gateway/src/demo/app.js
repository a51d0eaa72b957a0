// The demo page: a shared list on one Tandem dataset, edited live by several users.
// Each item is one record: key = item id, value = JSON {text, done, at}.
// The page gets its user from ?user=NAME and its token from the dev-mode endpoint
// /dev/token; in a real app the token comes from the app's own auth.

import { TandemClient } from '/sdk/tandem.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const user = (params.get('user') ?? '').trim();

class DevModeOff extends Error {}

/** The dev-mode token endpoint (404 unless the server runs with --dev). */
async function fetchToken() {
  const res = await fetch(`/dev/token?sub=${encodeURIComponent(user)}`, { cache: 'no-store' });
  if (res.status === 404) throw new DevModeOff('dev mode is off');
  if (!res.ok) throw new Error(`token request failed: ${res.status} ${await res.text()}`);
  return (await res.json()).token;
}

function showMessage(text, kind = 'info') {
  const m = $('message');
  m.textContent = text;
  m.dataset.kind = kind;
  m.hidden = !text;
}

function log(text, kind = 'info') {
  const li = document.createElement('li');
  li.className = kind;
  const time = document.createElement('time');
  time.textContent = new Date().toLocaleTimeString();
  li.append(time, ' ', text);
  $('log').prepend(li);
  while ($('log').children.length > 8) $('log').lastChild.remove();
}

/** An item's fields from a record value (tolerates values written by other tools). */
function parseItem(value) {
  try {
    const v = JSON.parse(value);
    if (v && typeof v === 'object' && typeof v.text === 'string') {
      return { text: v.text, done: !!v.done, at: Number(v.at) || 0 };
    }
  } catch {
    // not JSON: show it as text
  }
  return { text: String(value), done: false, at: 0 };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const board = params.get('board') || `${user}/groceries`;
  const slash = board.indexOf('/');
  const owner = slash > 0 ? board.slice(0, slash) : user;
  const name = slash > 0 ? board.slice(slash + 1) : board;
  const mine = owner === user;

  $('board').textContent = `${owner}/${name}`;
  $('who').hidden = false;
  $('who-text').innerHTML = '';
  $('who-text').append('You are ', Object.assign(document.createElement('strong'), { textContent: user }), mine ? ' (owner).' : ` (shared by ${owner}).`);
  document.title = `${owner}/${name} · Tandem demo`;

  try {
    await fetchToken();
  } catch (e) {
    if (e instanceof DevModeOff) {
      showMessage(
        'This demo needs dev mode: start the server with `tandem serve --dev`. Dev mode mints ' +
          'a token for any name at /dev/token, so it only runs on loopback. In your app, tokens ' +
          "come from your app's own auth.",
        'error',
      );
      $('conn').textContent = 'no token';
      $('conn').dataset.state = 'failed';
      return;
    }
    // Offline or the server is down: the client keeps trying.
  }

  const client = TandemClient.connect(location.origin, fetchToken, {
    identity: user,
    deviceId: `${user}-browser`,
    autoSync: true,
  });
  const conn = $('conn');
  const showState = (state) => {
    conn.dataset.state = state;
    conn.textContent = state;
    if (state === 'failed') showMessage(`Disconnected for good: ${client.lastError?.message ?? 'refused'}`, 'error');
  };
  showState(client.state);
  client.on('state', showState);
  // The sync-status pill follows the client's status: uploading, or when the server last
  // confirmed this device's copy (lastSyncedAt).
  client.onStatus(showSyncStatus);
  setUpSignOut(client);

  // Open the list; until the owner shares it, the server refuses (forbidden): wait and retry.
  await client.waitOnline(3000).catch(() => {});
  let ds;
  for (;;) {
    try {
      ds = await client.open(name, { owner, conflictHandler: 'latestDeviceTime', autoSync: true });
      break;
    } catch (e) {
      if (e.code !== 'forbidden') throw e;
      showMessage(`${owner} has not shared “${name}” with you yet. Waiting…`, 'warn');
      await sleep(2000);
    }
  }
  showMessage('');
  window.tandem = { client, dataset: ds };

  // One render per new snapshot: local edits (also of a pending item, or its removal while
  // offline), other tabs' edits, remote changes and acks alike.
  const render = renderer(ds);
  ds.onSnapshot(render);

  ds.on('conflict', ({ key, local, server, resolution }) => {
    const label = parseItem(local.value ?? server?.value ?? key).text;
    const who = server?.lastModifiedBy && server.lastModifiedBy !== user ? server.lastModifiedBy : 'another device';
    const text =
      resolution.type === 'keepLocal'
        ? `conflict on '${label}': kept the newest edit (yours)`
        : resolution.type === 'takeRemote'
          ? `conflict on '${label}': kept the newest edit (${who}'s)`
          : `conflict on '${label}': merged`;
    log(text, 'conflict');
    render();
  });
  ds.on('deleted', () => log(`${owner} deleted this list; your unsynced changes are kept`, 'warn'));
  ds.on('revoked', async () => {
    showMessage(`${owner} stopped sharing “${name}” with you. Waiting to be shared again…`, 'warn');
    log('access revoked', 'warn');
    while (ds.revoked) {
      await sleep(2000);
      if (!client.online) continue;
      try {
        await ds.subscribe();
        showMessage('');
        log('shared again');
        if (ds.pending) ds.sync().catch(() => {});
      } catch {
        // still not shared
      }
    }
  });
  ds.on('error', (e) => log(`sync problem: ${e.message}`, 'error'));
  client.on('online', () => log('online'));
  client.on('offline', () => log('offline: edits are kept on this device'));

  $('list').hidden = false;
  $('add').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $('new-item');
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    const key = `item-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`;
    await ds.put(key, JSON.stringify({ text, done: false, at: Date.now() }));
  });

  if (mine) {
    $('share').hidden = false;
    $('share').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const who = $('share-with').value.trim();
      if (!who) return;
      try {
        await client.grant(name, who, 'write');
        $('share-with').value = '';
        const link = `${location.origin}/?user=${encodeURIComponent(who)}&board=${encodeURIComponent(owner)}/${encodeURIComponent(name)}`;
        log(`shared with ${who} (can edit): ${link}`);
      } catch (e) {
        log(e.code === 'offline' ? 'go online to share' : `cannot share: ${e.message}`, 'error');
      }
    });
  }
}

function showSyncStatus(status) {
  const pill = $('synced');
  pill.dataset.syncedAt = status.lastSyncedAt === null ? '' : String(status.lastSyncedAt);
  pill.dataset.uploading = String(status.uploading);
  pill.textContent = status.uploading
    ? 'uploading…'
    : status.lastSyncedAt === null
      ? 'not synced yet'
      : `synced ${new Date(status.lastSyncedAt).toLocaleTimeString()}`;
  // A sign-out warning goes once nothing is left unsynced.
  if (!$('signout-warning').hidden && status.pending === 0) {
    $('signout-warning').hidden = true;
    log('all changes synced: signing out is safe now');
  }
}

/** Sign-out deletes this user's data from the device; with unsynced changes it warns first. */
function setUpSignOut(client) {
  const button = $('signout');
  button.hidden = false;
  const signedOut = (removed) => {
    $('list').hidden = true;
    $('signout-warning').hidden = true;
    button.hidden = true;
    showMessage(`Signed out: ${removed.length} list${removed.length === 1 ? '' : 's'} of ${user} deleted from this device.`, 'info');
    $('conn').dataset.state = 'closed';
    $('conn').textContent = 'signed out';
  };
  button.addEventListener('click', async () => {
    try {
      signedOut(await client.wipe());
    } catch (e) {
      if (e.code !== 'pending_writes') {
        log(`cannot sign out: ${e.message}`, 'error');
        return;
      }
      const n = client.status.pending;
      $('signout-text').textContent =
        `${n} change${n === 1 ? ' is' : 's are'} not synced yet (${e.keys.join(', ')}). ` +
        `${n === 1 ? 'It reaches' : 'They reach'} the server when this device is online again. ` +
        `Signing out now deletes ${n === 1 ? 'it' : 'them'} from this device.`;
      $('signout-warning').hidden = false;
    }
  });
  $('signout-cancel').addEventListener('click', () => {
    $('signout-warning').hidden = true;
  });
  $('signout-force').addEventListener('click', async () => {
    signedOut(await client.wipe({ force: true }));
  });
}

/** Renders the list in place, keyed by record, leaving an input being edited alone. */
function renderer(ds) {
  const ul = $('items');
  /** @type {Map<string, HTMLLIElement>} */
  const rows = new Map();

  function row(key) {
    const li = document.createElement('li');
    li.dataset.key = key;
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.title = 'done';
    const text = document.createElement('input');
    text.className = 'text';
    text.maxLength = 200;
    const badge = document.createElement('span');
    badge.className = 'badge';
    badge.textContent = 'pending';
    const del = document.createElement('button');
    del.className = 'delete';
    del.type = 'button';
    del.title = 'Delete';
    del.textContent = '×';
    const current = () => parseItem(ds.get(key) ?? '{}');
    box.addEventListener('change', () => ds.put(key, JSON.stringify({ ...current(), done: box.checked })));
    text.addEventListener('change', () => {
      const t = text.value.trim();
      if (t) ds.put(key, JSON.stringify({ ...current(), text: t }));
    });
    text.addEventListener('keydown', (e) => e.key === 'Enter' && text.blur());
    del.addEventListener('click', () => ds.remove(key));
    li.append(box, text, badge, del);
    return li;
  }

  return function render() {
    const items = [...ds.records()]
      .map(([key, value]) => ({ key, ...parseItem(value), dirty: !!ds.record(key)?.dirty }))
      .sort((a, b) => a.at - b.at || a.key.localeCompare(b.key));
    const keep = new Set(items.map((i) => i.key));
    for (const [key, li] of rows) {
      if (!keep.has(key)) {
        li.remove();
        rows.delete(key);
      }
    }
    items.forEach((item, index) => {
      let li = rows.get(item.key);
      if (!li) rows.set(item.key, (li = row(item.key)));
      const [box, text] = li.children;
      li.dataset.text = item.text;
      li.dataset.done = String(item.done);
      li.classList.toggle('done', item.done);
      li.classList.toggle('dirty', item.dirty);
      box.checked = item.done;
      if (document.activeElement !== text) text.value = item.text;
      if (ul.children[index] !== li) ul.insertBefore(li, ul.children[index] ?? null);
    });
    $('empty').hidden = items.length > 0;
    const n = ds.pending;
    const pending = $('pending');
    pending.dataset.count = String(n);
    pending.textContent = n === 0 ? 'all changes synced' : `${n} pending change${n === 1 ? '' : 's'}`;
  };
}

if (!user) {
  $('chooser').hidden = false;
  $('conn').hidden = true;
  $('pending').hidden = true;
  $('synced').hidden = true;
} else {
  main().catch((e) => {
    console.error(e);
    showMessage(`Something went wrong: ${e.message}`, 'error');
  });
}
