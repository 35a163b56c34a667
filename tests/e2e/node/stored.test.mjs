// Stored broadcasts and replay with supabase-js: `send({..., persist: true})` over vsn 2.0.0
// and `httpSend(..., {persist})` store the message (as the sender: realtime.messages INSERT
// policies decide), a join with `config.broadcast.replay` gets the stored messages with
// `meta.replayed` before anything live, and a persisting send that is not allowed resolves
// with the reason.
//
// The roles and topics are this file's own (suffixed), so its policies touch no other test.
// "Nothing else arrived" is proved with a fence: a later realtime.send on the same topic.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, newClient, closeClients, mintToken, subscribed,
  EventLog, ident, rawConnect,
} from './helpers.mjs'

const sfx = suffix()
const writer = `e2e_store_w_${sfx}`
const reader = `e2e_store_r_${sfx}`
const room = `stored-${sfx}`

before(async () => {
  await ensureRoles(writer, reader)
  await sql(`CREATE POLICY ${ident(`store_read_${sfx}`)} ON realtime.messages FOR SELECT
    TO ${ident(writer)}, ${ident(reader)} USING (topic = '${room}' AND extension = 'broadcast')`)
  await sql(`CREATE POLICY ${ident(`store_write_${sfx}`)} ON realtime.messages FOR INSERT
    TO ${ident(writer)} WITH CHECK (topic = '${room}' AND extension = 'broadcast')`)
})

after(async () => {
  await sql(`DROP POLICY IF EXISTS ${ident(`store_read_${sfx}`)} ON realtime.messages`)
  await sql(`DROP POLICY IF EXISTS ${ident(`store_write_${sfx}`)} ON realtime.messages`)
  await closeClients()
  await closeSql()
})

/** A private channel on `room` with a broadcast listener; returns the channel and its log. */
async function join(role, broadcast = {}) {
  const client = newClient(mintToken({ role, claims: { sub: `${role}-user` } }))
  const channel = client.channel(room, { config: { private: true, broadcast } })
  const log = new EventLog(`broadcasts of ${role} on ${room}`)
  channel.on('broadcast', { event: '*' }, (msg) => log.push(msg))
  await subscribed(channel)
  return { client, channel, log }
}

let fences = 0
/** A superuser realtime.send on the room; resolves once `log` has it. */
async function fence(log) {
  const n = ++fences
  await sql(`SELECT realtime.send(jsonb_build_object('fence', $1::int), 'fence', $2, true)`, [n, room])
  await log.find((m) => m.event === 'fence' && m.payload.fence === n, { what: `fence ${n}` })
}

test('send with persist: stored as the sender, delivered once with the row id, replayed later', async () => {
  const watcher = await join(reader)
  const sender = await join(writer, { ack: true })
  const status = await sender.channel.send({
    type: 'broadcast', event: 'chat', payload: { text: 'hello' }, persist: true,
  })
  assert.equal(status, 'ok')
  const got = await watcher.log.find((m) => m.event === 'chat')
  assert.deepEqual(got.payload, { text: 'hello' })
  assert.equal(typeof got.meta?.id, 'string', `live copy carries the row id: ${JSON.stringify(got)}`)
  const { rows } = await sql(
    `SELECT topic, event, payload, private, skip_broadcast FROM realtime.messages WHERE id = $1`,
    [got.meta.id],
  )
  assert.deepEqual(rows, [{ topic: room, event: 'chat', payload: { text: 'hello' }, private: true, skip_broadcast: true }])
  // httpSend with a ttl: stored with an expiry, delivered live.
  const res = await sender.channel.httpSend('chat', { text: 'over http' }, { persist: { ttl: 600 } })
  assert.deepEqual(res, { success: true })
  const http = await watcher.log.find((m) => m.payload?.text === 'over http')
  const ttl = await sql(
    `SELECT extract(epoch from expires_at - inserted_at)::int AS ttl FROM realtime.messages WHERE id = $1`,
    [http.meta.id],
  )
  assert.ok(Math.abs(ttl.rows[0].ttl - 600) <= 1, `ttl ${ttl.rows[0].ttl}`)
  await fence(watcher.log)
  assert.equal(
    watcher.log.items.filter((m) => m.event === 'chat').length, 2,
    'each persisted message arrives once (the WAL copy is not delivered again)',
  )

  // A later join with replay gets both, oldest first, marked replayed, before live messages.
  const late = newClient(mintToken({ role: reader, claims: { sub: 'late' } }))
  const channel = late.channel(room, {
    config: { private: true, broadcast: { replay: { since: Date.now() - 60_000, limit: 10 } } },
  })
  const log = new EventLog('late joiner')
  channel.on('broadcast', { event: '*' }, (msg) => log.push(msg))
  await subscribed(channel)
  await fence(log)
  const seen = log.items.map((m) => [m.event, m.payload.text ?? m.payload.fence, m.meta?.replayed ?? false])
  assert.deepEqual(seen.slice(0, 2), [['chat', 'hello', true], ['chat', 'over http', true]])
  assert.deepEqual(
    log.items.slice(0, 2).map((m) => m.meta.id),
    [got.meta.id, http.meta.id],
    'meta.id is the stored row id',
  )
  // Only the fence sends that came before this join are replayed too; the live fence is last.
  assert.deepEqual(seen.at(-1), ['fence', fences, false])
  assert.ok(seen.slice(0, -1).every(([, , replayed]) => replayed), `replayed before live: ${JSON.stringify(seen)}`)
})

test('a persisting send that is not allowed resolves with the reason', async () => {
  const { channel } = await join(reader, { ack: true })
  const status = await channel.send({
    type: 'broadcast', event: 'chat', payload: { text: 'denied' }, persist: true,
  })
  assert.equal(
    status,
    `Unauthorized: You do not have permissions to write to this Channel topic: ${room}`,
  )
  const { rows } = await sql(
    `SELECT count(*)::int AS n FROM realtime.messages WHERE topic = $1 AND payload->>'text' = 'denied'`,
    [room],
  )
  assert.equal(rows[0].n, 0, 'nothing stored')
  await assert.rejects(channel.httpSend('chat', { text: 'denied' }, { persist: true }), /Unauthorized/)
})

test('replay on a public channel: refused by the client, and by the server in Supabase\'s words', async () => {
  // The official client refuses to build such a channel at all...
  const client = newClient(mintToken({ role: reader }))
  assert.throws(
    () => client.channel(`public-${sfx}`, { config: { broadcast: { replay: { since: 0 } } } }),
    /must be a private channel/,
  )
  // ...and a client that sends the join anyway gets the reference server's error.
  const token = mintToken({ role: reader })
  const raw = await rawConnect({ token })
  raw.send(['1', '1', `realtime:public-${sfx}`, 'phx_join', {
    config: { broadcast: { replay: { since: 0 } }, presence: { enabled: false }, private: false, postgres_changes: [] },
    access_token: token,
  }])
  const reply = await raw.next((f) => Array.isArray(f) && f[1] === '1' && f[3] === 'phx_reply')
  assert.deepEqual(reply[4], {
    status: 'error',
    response: { reason: 'UnableToReplayMessages: Replay is not allowed for public channels' },
  })
  raw.close()
})
