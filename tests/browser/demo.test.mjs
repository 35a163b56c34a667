// The demo page in headless Chromium: live postgres_changes (from SQL and from the page,
// with row-level security deciding who sees what), presence between two users, broadcast
// cursors. Started by ./run, which provides:
//   DEMO_URL      http://127.0.0.1:PORT of a running `walcast demo`
//   DATABASE_URL  the demo database (the URL the demo printed)
//   PSQL          psql to run SQL with
//   CHROMIUM      the browser executable (Debian's chromium)
//   ARTIFACTS     where screenshots go
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run this through tests/browser/run`);
  return v;
};
const DEMO_URL = env('DEMO_URL');
const DATABASE_URL = env('DATABASE_URL');
const PSQL = process.env.PSQL || 'psql';
const ARTIFACTS = env('ARTIFACTS');
// Generous: these wait for something to happen, they do not measure how fast it happens.
const WAIT = { timeout: 30_000 };

const sql = (statement) =>
  execFileSync(PSQL, ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', DATABASE_URL, '-c', statement], {
    encoding: 'utf8',
  }).trim();

async function openAs(browser, user) {
  // One context per user: separate storage, like two people on two machines.
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  const problems = [];
  // Everything the page needs comes from the demo server: refuse (and report) anything else.
  await context.route((url) => !url.href.startsWith(DEMO_URL), (route) => {
    problems.push(`external request: ${route.request().url()}`);
    return route.abort();
  });
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && problems.push(`console: ${m.text()}`));
  await page.goto(`${DEMO_URL}/?user=${encodeURIComponent(user)}`);
  await page.locator('#status-todos[data-status="SUBSCRIBED"]').waitFor(WAIT);
  await page.locator('#status-room[data-status="SUBSCRIBED"]').waitFor(WAIT);
  return { context, page, problems };
}

const todo = (page, title) => page.locator('#todos li', { hasText: title });
const shot = (page, name) => page.screenshot({ path: join(ARTIFACTS, name), fullPage: true });

test('demo page: live changes, presence and cursors between two users', async (t) => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const b = await chromium.launch({
    executablePath: env('CHROMIUM'),
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  // Playwright gives the browser a new, empty profile directory and removes it on close.
  t.after(() => b.close());

  const alice = await openAs(b, 'alice');
  const bob = await openAs(b, 'bob');

  await t.test('the seeded todos are listed', async () => {
    await todo(alice.page, 'Open this page in a second window').waitFor(WAIT);
    assert.equal(await alice.page.locator('#todos li').count(), 2);
  });

  await t.test('each page sees the other user in presence', async () => {
    await alice.page.locator('#online li[data-name="bob"]').waitFor(WAIT);
    await bob.page.locator('#online li[data-name="alice"]').waitFor(WAIT);
    assert.deepEqual(
      (await alice.page.locator('#online li').evaluateAll((els) => els.map((e) => e.dataset.name))).sort(),
      ['alice', 'bob'],
    );
    await shot(alice.page, '01-alice-presence.png');
    await shot(bob.page, '02-bob-presence.png');
  });

  await t.test('a row inserted from SQL appears on both pages', async () => {
    const title = `hello from SQL ${process.pid}`;
    const id = sql(`insert into todos (title) values ('${title}') returning id`);
    assert.match(id, /^\d+$/);
    await todo(alice.page, title).waitFor(WAIT);
    await todo(bob.page, title).waitFor(WAIT);
    assert.equal(await todo(bob.page, title).getAttribute('data-id'), id);
    assert.equal(await todo(bob.page, title).locator('.by').textContent(), 'SQL');
    await shot(alice.page, '03-alice-row-from-sql.png');
  });

  await t.test('an update and a delete from SQL reach the page', async () => {
    const title = `to be changed ${process.pid}`;
    const id = sql(`insert into todos (title) values ('${title}') returning id`);
    await todo(bob.page, title).waitFor(WAIT);
    sql(`update todos set done = true where id = ${id}`);
    await bob.page.locator(`#todos li.done[data-id="${id}"]`).waitFor(WAIT);
    sql(`delete from todos where id = ${id}`);
    await bob.page.locator(`#todos li[data-id="${id}"]`).waitFor({ state: 'detached', ...WAIT });
  });

  await t.test("todos added on one page appear on the other; private ones only for their owner", async () => {
    const secret = `alice private ${process.pid}`;
    const open = `alice public ${process.pid}`;
    await alice.page.fill('#title', secret);
    await alice.page.check('#private');
    await alice.page.click('#add button');
    await todo(alice.page, secret).waitFor(WAIT);
    await alice.page.uncheck('#private');
    await alice.page.fill('#title', open);
    await alice.page.click('#add button');
    await todo(bob.page, open).waitFor(WAIT);
    // Changes arrive in commit order: the private row was committed first, so had it been
    // sent to bob it would be on his page by now.
    assert.equal(await todo(bob.page, secret).count(), 0);
    assert.equal(await todo(bob.page, open).locator('.by').textContent(), 'alice');
    const owner = sql(`select owner_name from todos where title = '${secret}' and private`);
    assert.equal(owner, 'alice');
    await shot(bob.page, '04-bob-sees-alice-todo.png');
  });

  await t.test("alice's cursor moves on bob's page (broadcast)", async () => {
    const cursor = bob.page.locator('.cursor[data-name="alice"]');
    // Keep moving until one position arrives (a broadcast sent before the join would be
    // dropped; moving again is what a person does too).
    for (let i = 0; i < 100 && (await cursor.count()) === 0; i++) {
      await alice.page.mouse.move(300 + (i % 10) * 20, 300 + i);
      await bob.page.waitForTimeout(100);
    }
    await cursor.waitFor(WAIT);
    await alice.page.mouse.move(640, 420);
    await bob.page.waitForFunction(
      () => document.querySelector('.cursor[data-name="alice"]')?.style.left === '640px',
      null,
      WAIT,
    );
    assert.equal(await cursor.locator('span').textContent(), 'alice');
    await shot(bob.page, '05-bob-sees-alice-cursor.png');
  });

  await t.test('closing a page removes its user from the others\' presence', async () => {
    await bob.context.close();
    await alice.page.locator('#online li[data-name="bob"]').waitFor({ state: 'detached', ...WAIT });
    assert.equal(await alice.page.locator('#online li').count(), 1);
    await shot(alice.page, '06-alice-after-bob-left.png');
  });

  assert.deepEqual([...alice.problems, ...bob.problems], []);
});
