// Server-wide options Supabase projects have (issue #14, items 5 and 6), each on a walcast
// of its own: --private-only refuses public channels in Supabase's words; --presence-enabled
// syncs presence on channels whose client did not ask for it; --rls-deletes=primary-key
// sends the key of a DELETE the policies cannot judge.

import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import {
  mintToken, suffix, subscribe, subscribed, delay, newClient, closeClients, ensureRoles,
  createTable, sql, listen, collectSystem,
} from './helpers.mjs'
import { startOwnServer } from './own-server.mjs'

const own = []
const ownClients = []

function clientOf(http, key) {
  const c = createClient(http, key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: WebSocket },
  })
  ownClients.push(c)
  return c
}

after(async () => {
  for (const c of ownClients) {
    await Promise.race([c.removeAllChannels(), delay(2000)]).catch(() => {})
    c.realtime.disconnect()
  }
  await closeClients()
  for (const s of own) await s.stop()
})

async function waitFor(pred, ms = 10_000) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    if (pred()) return true
    await delay(50)
  }
  return pred()
}

test('--private-only refuses a public channel with PrivateOnly', async () => {
  await ensureRoles()
  const server = await startOwnServer(['--private-only'])
  own.push(server)
  const key = mintToken({ role: 'anon' })
  const c = clientOf(server.http, key)
  const ch = c.channel(`lobby-${suffix()}`)
  const { statuses, subscribed: refused } = subscribe(ch)
  refused.catch(() => {}) // the refusal is what this test expects; judged below
  const items = await statuses.until((s) => s.length > 0, { what: 'a status' })
  assert.equal(items[0].status, 'CHANNEL_ERROR', server.log())
  assert.match(items[0].error, /PrivateOnly: This project only allows private channels/)
})

test('--presence-enabled gives presence to a channel that did not ask', async () => {
  await ensureRoles()
  const server = await startOwnServer(['--presence-enabled'])
  own.push(server)
  const key = mintToken({ role: 'anon' })
  const topic = `room-${suffix()}`

  // bob tracks (his client enables presence itself); alice listens to nothing presence.
  const bob = clientOf(server.http, key).channel(topic, { config: { presence: { key: 'bob' } } })
  bob.on('presence', { event: 'sync' }, () => {})
  await subscribed(bob)
  assert.equal(await bob.track({ here: true }), 'ok')
  const alice = clientOf(server.http, key).channel(topic)
  await subscribed(alice)
  assert.ok(
    await waitFor(() => Object.keys(alice.presenceState()).includes('bob')),
    `alice never saw bob's presence: ${JSON.stringify(alice.presenceState())}`,
  )

  // The same shape on the suite's server (no flag): alice's channel gets no presence.
  const bob2 = newClient(key).channel(topic, { config: { presence: { key: 'bob' } } })
  bob2.on('presence', { event: 'sync' }, () => {})
  await subscribed(bob2)
  assert.equal(await bob2.track({ here: true }), 'ok')
  const alice2 = newClient(key).channel(topic)
  let fenced = false
  alice2.on('broadcast', { event: 'fence' }, () => (fenced = true))
  await subscribed(alice2)
  // A fence: bob2 tracks again, then broadcasts; the topic delivers in order, so once the
  // broadcast is in, any presence alice2 was going to get is in too.
  await bob2.track({ here: 'again' })
  assert.equal(await bob2.send({ type: 'broadcast', event: 'fence', payload: {} }), 'ok')
  assert.ok(await waitFor(() => fenced), 'the fence broadcast arrived')
  assert.deepEqual(Object.keys(alice2.presenceState()), [], 'without the flag, no presence for alice')
})

test('--rls-deletes=primary-key delivers the key of a DELETE on an RLS table', async () => {
  await ensureRoles()
  const name = `rlsdel_${suffix()}`
  const t = await createTable(name, 'id int8 PRIMARY KEY, owner text NOT NULL')
  await sql(`ALTER TABLE ${t} ENABLE ROW LEVEL SECURITY`)
  await sql(`CREATE POLICY own ON ${t} FOR SELECT TO authenticated
             USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))`)
  const server = await startOwnServer(['--rls-deletes', 'primary-key'])
  own.push(server)
  const key = mintToken({ role: 'authenticated', claims: { sub: 'ann' } })
  const keyed = clientOf(server.http, key).channel(`del-${suffix()}`)
  const keyedLog = listen(keyed, { event: '*', schema: 'public', table: name })
  const keyedSystem = collectSystem(keyed)
  await subscribed(keyed)
  // The same subscription on the suite's server (default: drop).
  const safe = newClient(key).channel(`del-${suffix()}`)
  const safeLog = listen(safe, { event: '*', schema: 'public', table: name })
  const safeSystem = collectSystem(safe)
  await subscribed(safe)

  await sql(`INSERT INTO ${t} VALUES (1, 'ann')`)
  await sql(`DELETE FROM ${t} WHERE id = 1`)
  await sql(`INSERT INTO ${t} VALUES (2, 'ann')`) // the fence: after it, nothing is on its way
  const done = (items) => items.some((p) => p.eventType === 'INSERT' && p.new.id === 2)
  await keyedLog.until(done, { what: 'the fence on the opted-in server' })
  await safeLog.until(done, { what: 'the fence on the default server' })
  const kinds = (log) => log.items.map((p) => (p.eventType === 'DELETE' ? `DELETE ${JSON.stringify(p.old)}` : `${p.eventType} ${p.new.id}`))
  assert.deepEqual(kinds(keyedLog), ['INSERT 1', 'DELETE {"id":1}', 'INSERT 2'])
  assert.deepEqual(kinds(safeLog), ['INSERT 1', 'INSERT 2'])
  // The default server said so at join, naming the table and the fix; the opted-in one had
  // nothing to warn about.
  const warnings = (log) => log.items.filter((m) => String(m.message).startsWith('DeletesNotDelivered'))
  const [warned, ...more] = warnings(safeSystem)
  assert.ok(warned, `a DeletesNotDelivered notice: ${JSON.stringify(safeSystem.items)}`)
  assert.equal(more.length, 0)
  assert.equal(warned.status, 'ok')
  assert.equal(warned.extension, 'postgres_changes')
  assert.match(warned.message, new RegExp(`public\\.${name} .*REPLICA IDENTITY FULL`))
  assert.deepEqual(warnings(keyedSystem), [])
})
