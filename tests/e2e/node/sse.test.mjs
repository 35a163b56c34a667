// Change feeds with a real EventSource client (the `eventsource` package, pinned): resume
// with Last-Event-ID after a cut, 409 stops the EventSource, a snapshot with concurrent
// writes (each row exactly once), and row-level security on the stream.

import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { EventSource } from 'eventsource'
import {
  env, mintToken, suffix, delay, ensureRoles, createTable, sql, closeSql, ident, EventLog,
} from './helpers.mjs'
import { startOwnServer } from './own-server.mjs'

const own = []
const sources = []

after(async () => {
  for (const es of sources) es.close()
  for (const s of own) await s.stop()
  await closeSql()
})

function feedUrl(http, table, key, extra = '') {
  return `${http}/api/changes?schema=public&table=${encodeURIComponent(table)}&apikey=${key}${extra}`
}

/**
 * A fetch for EventSource that records each request's Last-Event-ID and can cut the
 * current response (the client then reconnects as after a network failure).
 */
function cuttableFetch() {
  const requests = []
  let cutCurrent = () => {}
  const fetchFn = async (url, init) => {
    requests.push(new Headers(init?.headers).get('last-event-id'))
    const res = await fetch(url, init)
    if (!res.body) return res
    const reader = res.body.getReader()
    let closed = false
    const body = new ReadableStream({
      start(controller) {
        cutCurrent = () => {
          if (closed) return
          closed = true
          reader.cancel().catch(() => {})
          controller.close()
        }
      },
      async pull(controller) {
        const { done, value } = await reader.read().catch(() => ({ done: true }))
        if (closed) return
        if (done) {
          closed = true
          controller.close()
        } else {
          controller.enqueue(value)
        }
      },
      cancel() {
        closed = true
        reader.cancel().catch(() => {})
      },
    })
    return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers })
  }
  return { fetchFn, requests, cut: () => cutCurrent() }
}

function open(url, opts = {}) {
  const es = new EventSource(url, opts)
  sources.push(es)
  const log = new EventLog(url.split('?')[0])
  for (const name of ['change', 'snapshot', 'snapshot_end']) {
    es.addEventListener(name, (e) => log.push({ event: name, id: e.lastEventId, data: JSON.parse(e.data) }))
  }
  const errors = new EventLog('errors')
  es.onerror = (e) => errors.push({ code: e.code, message: e.message, state: es.readyState })
  return { es, log, errors }
}

async function insertRows(table, ids, value = (i) => `v${i}`) {
  for (const i of ids) {
    await sql(`INSERT INTO ${table} (id, v) VALUES ($1, $2)`, [i, value(i)])
  }
}

test('Last-Event-ID resumes after a cut with neither gap nor repeat', async () => {
  await ensureRoles()
  const name = `feed_${suffix()}`
  const table = await createTable(name, 'id bigint PRIMARY KEY, v text')
  const key = mintToken({ role: 'anon' })
  const { fetchFn, requests, cut } = cuttableFetch()
  const { es, log } = open(feedUrl(env.http, name, key), { fetch: fetchFn })
  await new Promise((resolve, reject) => {
    es.onopen = resolve
    setTimeout(() => reject(new Error('the feed did not open')), 10_000)
  })
  await insertRows(table, [1, 2, 3, 4, 5])
  await log.count(3)
  cut()
  const before = log.length
  const lastBeforeCut = log.items[before - 1].id
  // Committed while the client is away (it reconnects after the server's retry delay).
  await insertRows(table, [6, 7, 8])
  const all = await log.until((items) => items.length >= 8, { timeout: 20_000, what: '8 changes' })
  assert.deepEqual(all.map((e) => e.data.record.id), [1, 2, 3, 4, 5, 6, 7, 8])
  assert.equal(requests.length, 2, 'one reconnection')
  assert.equal(requests[0], null)
  assert.equal(requests[1], lastBeforeCut, 'the reconnection sent the last id it received')
  const ids = all.map((e) => e.id)
  assert.deepEqual([...ids].sort(), ids, 'ids sort in commit order')
  assert.equal(new Set(ids).size, ids.length)
  assert.equal(all[0].data.type, 'INSERT')
  assert.equal(all[0].data.table, name)
  assert.deepEqual(all[0].data.record, { id: 1, v: 'v1' })
  // A fence: one more change arrives next, nothing repeated before it.
  await insertRows(table, [9])
  const fenced = await log.count(9)
  assert.deepEqual(fenced.map((e) => e.data.record.id), [1, 2, 3, 4, 5, 6, 7, 8, 9])
  es.close()
})

test('a position older than the history gets 409 and the EventSource stops', async () => {
  await ensureRoles()
  // A history of one byte keeps nothing: only the newest position can be resumed.
  const server = await startOwnServer(['--history-bytes', '1'])
  own.push(server)
  const name = `feed_${suffix()}`
  const table = await createTable(name, 'id bigint PRIMARY KEY, v text')
  const key = mintToken({ role: 'anon' })
  const first = open(feedUrl(server.http, name, key))
  await new Promise((resolve) => (first.es.onopen = resolve))
  await insertRows(table, [1, 2, 3])
  const got = await first.log.count(3)
  first.es.close()
  const old = got[0].id
  const { fetchFn, requests } = cuttableFetch()
  const late = open(feedUrl(server.http, name, key, `&last_event_id=${old}`), { fetch: fetchFn })
  const [err] = await late.errors.count(1)
  assert.equal(err.code, 409, JSON.stringify(err))
  assert.equal(late.es.readyState, EventSource.CLOSED, 'the EventSource gave up instead of looping')
  // Longer than the retry delay: no second request was made.
  await delay(4000)
  assert.equal(requests.length, 1)
  const body = await (await fetch(feedUrl(server.http, name, key, `&last_event_id=${old}`), {
    headers: { accept: 'text/event-stream' },
  })).json()
  assert.match(body.error, /^ResyncRequired: /)
})

test('snapshot=true with concurrent writes gives each row exactly once', async () => {
  await ensureRoles()
  const name = `feed_${suffix()}`
  const table = await createTable(name, 'id bigint PRIMARY KEY, v text')
  await sql(`INSERT INTO ${table} SELECT g, 'seed' FROM generate_series(1, 500) g`)
  const key = mintToken({ role: 'anon' })
  let stop = false
  let written = 0
  const writer = (async () => {
    for (let i = 1000; !stop; i++) {
      await sql(`INSERT INTO ${table} (id, v) VALUES ($1, 'new')`, [i])
      await sql(`UPDATE ${table} SET v = $2 WHERE id = $1`, [1 + (i % 500), `u${i}`])
      written++
    }
  })()
  await delay(200)
  const { log } = open(feedUrl(env.http, name, key, '&snapshot=true'))
  await log.find((e) => e.event === 'snapshot_end', { timeout: 20_000 })
  await delay(300)
  stop = true
  await writer
  assert.ok(written > 0)
  const { rows } = await sql(`SELECT id, v FROM ${table} ORDER BY id`)
  const want = new Map(rows.map((r) => [Number(r.id), r.v]))
  const replayState = (items) => {
    const state = new Map()
    const inserted = new Map()
    let ended = false
    for (const e of items) {
      if (e.event === 'snapshot') {
        assert.ok(!ended, 'snapshot rows come before snapshot_end')
        const id = e.data.record.id
        assert.ok(!state.has(id), `row ${id} twice in the snapshot`)
        state.set(id, e.data.record.v)
        inserted.set(id, (inserted.get(id) ?? 0) + 1)
      } else if (e.event === 'snapshot_end') {
        ended = true
      } else if (e.data.type === 'INSERT') {
        assert.ok(ended)
        const id = e.data.record.id
        assert.ok(!state.has(id), `insert of ${id} repeats a row already there`)
        state.set(id, e.data.record.v)
        inserted.set(id, (inserted.get(id) ?? 0) + 1)
      } else if (e.data.type === 'UPDATE') {
        assert.ok(state.has(e.data.record.id), 'an update follows its row')
        state.set(e.data.record.id, e.data.record.v)
      }
    }
    return { state, inserted }
  }
  const items = await log.until(
    (items) => {
      const { state } = replayState(items)
      return state.size === want.size && [...want].every(([id, v]) => state.get(id) === v)
    },
    { timeout: 30_000, what: 'the table as it is now' },
  )
  const { inserted } = replayState(items)
  assert.equal(inserted.size, want.size)
  assert.ok([...inserted.values()].every((n) => n === 1), 'each row exactly once')
  const end = items.find((e) => e.event === 'snapshot_end')
  assert.match(end.id, /^[0-9A-F]{24}$/)
})

test('row-level security applies to the stream', async () => {
  await ensureRoles()
  const name = `feed_${suffix()}`
  const table = await createTable(name, 'id bigint PRIMARY KEY, owner text NOT NULL, v text')
  await sql(`ALTER TABLE ${table} ENABLE ROW LEVEL SECURITY`)
  await sql(
    `CREATE POLICY ${ident(`own_${name}`)} ON ${table} FOR SELECT TO authenticated ` +
      `USING (owner = current_setting('request.jwt.claim.sub', true))`,
  )
  await sql(`INSERT INTO ${table} VALUES (1, 'alice', 'a'), (2, 'bob', 'b')`)
  const key = mintToken({ role: 'authenticated', claims: { sub: 'alice' } })
  const { log } = open(feedUrl(env.http, name, key, '&snapshot=true'))
  await log.find((e) => e.event === 'snapshot_end')
  for (const [id, owner] of [[3, 'bob'], [4, 'alice'], [5, 'bob'], [6, 'alice']]) {
    await sql(`INSERT INTO ${table} VALUES ($1, $2, 'x')`, [id, owner])
  }
  // Row 6 is the fence: changes arrive in commit order, so bob's row 5 would be before it.
  await log.find((e) => e.event === 'change' && e.data.record.id === 6)
  const seen = log.items.map((e) => [e.event, e.data.record?.id ?? null])
  assert.deepEqual(seen, [
    ['snapshot', 1],
    ['snapshot_end', null],
    ['change', 4],
    ['change', 6],
  ])
})
