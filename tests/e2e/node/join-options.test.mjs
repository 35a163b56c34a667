// Join options that tie a channel to the replication stream, with the official client:
// `config.postgres_changes_options.wait` (SUBSCRIBED means the bindings are live, or
// CHANNEL_ERROR with Supabase's PostgresChangesSubscribeTimeout) and
// `config.broadcast.replication_ready` (a `system` message once the stream is up, or the
// channel closed when it is not in time). The stream is made "not ready" with a second
// walcast started on a slot the first one holds: it serves sockets but never streams.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribe, subscribed, listen, collectSystem, delay,
} from './helpers.mjs'
import { startOwnServer } from './own-server.mjs'

const sfx = suffix()
const table = `joinopts_${sfx}`
const own = []
const ownClients = []
let supabase

function clientOf(http, key) {
  const c = createClient(http, key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: WebSocket },
  })
  ownClients.push(c)
  return c
}

before(async () => {
  await ensureRoles()
  await createTable(table, 'id int4 PRIMARY KEY, s text')
  supabase = newClient(mintToken())
})

after(async () => {
  for (const c of ownClients) {
    await Promise.race([c.removeAllChannels(), delay(2000)]).catch(() => {})
    c.realtime.disconnect()
  }
  await closeClients()
  for (const s of own.reverse()) await s.stop()
  await closeSql()
})

test('wait: SUBSCRIBED once the bindings are live; the next commit arrives', async () => {
  const channel = supabase.channel(`wait-${sfx}`, {
    config: { postgres_changes_options: { wait: true, timeout: 5000 } },
  })
  const system = collectSystem(channel)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table })
  await subscribed(channel)
  await system.find((m) => m.extension === 'postgres_changes' && m.status === 'ok')
  await sql(`INSERT INTO public."${table}" (id, s) VALUES (1, 'live')`)
  const [e] = await events.count(1)
  assert.deepStrictEqual(e.new, { id: 1, s: 'live' })
})

test('wait: a binding the server cannot subscribe refuses the join', async () => {
  const channel = supabase.channel(`wait-bad-${sfx}`, {
    config: { postgres_changes_options: { wait: true } },
  })
  listen(channel, { event: '*', schema: 'public', table: `no_such_table_${sfx}` })
  const { statuses, subscribed: refused } = subscribe(channel)
  refused.catch(() => {})
  const [first] = await statuses.until((s) => s.length > 0)
  assert.equal(first.status, 'CHANNEL_ERROR')
  assert.match(first.error, /^RealtimeDisabledForConfiguration: Unable to subscribe to changes with given parameters/)
})

test('replication_ready: the system message follows the join', async () => {
  const channel = supabase.channel(`ready-${sfx}`, { config: { broadcast: { replication_ready: true } } })
  const system = collectSystem(channel)
  await subscribed(channel)
  const msg = await system.find((m) => m.extension === 'system')
  assert.equal(msg.status, 'ok')
  assert.equal(msg.message, 'Replication connection established')
  assert.equal(msg.channel, `ready-${sfx}`)
})

test('without a stream: wait times out with PostgresChangesSubscribeTimeout, replication_ready closes the channel', async () => {
  const holder = await startOwnServer()
  own.push(holder)
  const stuck = await startOwnServer(
    ['--postgres-changes-wait-max-ms', '1000', '--replication-ready-timeout-ms', '1000'],
    { slot: holder.slot, probe: '/healthz' },
  )
  own.push(stuck)
  const ready = await fetch(`${stuck.http}/readyz`)
  assert.notEqual(ready.status, 200, 'the second server must not stream')
  const c = clientOf(stuck.http, mintToken())

  // The client asks for 5 s; the server caps it at 1 s and says so.
  const waiting = c.channel(`stuck-wait-${sfx}`, {
    config: { postgres_changes_options: { wait: true, timeout: 5000 } },
  })
  listen(waiting, { event: 'INSERT', schema: 'public', table })
  const started = Date.now()
  const { statuses, subscribed: refused } = subscribe(waiting, { timeout: 15_000 })
  refused.catch(() => {})
  const [first] = await statuses.until((s) => s.length > 0, { timeout: 15_000 })
  assert.equal(first.status, 'CHANNEL_ERROR', stuck.log())
  assert.equal(
    first.error,
    'PostgresChangesSubscribeTimeout: Timed out after 1000ms waiting for the postgres_changes subscription',
  )
  assert.ok(Date.now() - started >= 1000)

  const rr = c.channel(`stuck-ready-${sfx}`, { config: { broadcast: { replication_ready: true } } })
  const system = collectSystem(rr)
  const st = await subscribed(rr)
  const msg = await system.find((m) => m.extension === 'system')
  assert.equal(msg.status, 'error')
  assert.equal(msg.message, 'Replication connection was not established in time')
  await st.find((s) => s.status === 'CLOSED', { what: 'the channel closed by the server' })
})
