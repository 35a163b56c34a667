// Broadcast with supabase-js: between vsn 2.0.0 clients (binary kind 3 in, kind 4 out),
// across vsn 1.0.0 / 2.0.0, binary payloads, `self` and `ack`, the payload size limit, the
// REST endpoints (single and batch) and realtime.send() from SQL (committed vs rolled back).
//
// "Did not arrive" is proved with a fence: a later broadcast on the same topic from the
// same sender. One sender's broadcasts reach a channel in the order they were sent.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import WebSocket from 'ws'
import {
  env, suffix, sql, closeSql, ensureRoles, newClient, closeClients, mintToken, subscribed,
  EventLog, rawConnect, WAIT_MS,
} from './helpers.mjs'

const sfx = suffix()
const here = path.dirname(fileURLToPath(import.meta.url))

before(async () => {
  await ensureRoles()
  // Until the server applies sql/ at startup in every setup, install the functions here
  // (the file is idempotent).
  await sql(fs.readFileSync(path.join(here, '../../../sql/realtime_send.sql'), 'utf8'))
})

after(async () => {
  await closeClients()
  await closeSql()
})

/** A transport that records binary frames received and sent (first byte = kind). */
function binaryRecorder() {
  const record = { received: [], sent: [] }
  class Recording extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols)
      this.on('message', (data, isBinary) => {
        if (isBinary) record.received.push(Buffer.from(data))
      })
    }
    send(data, ...rest) {
      if (typeof data !== 'string') record.sent.push(Buffer.from(data))
      return super.send(data, ...rest)
    }
  }
  return { transport: Recording, record }
}

/** Subscribes a channel with a broadcast listener for every event; returns the log. */
async function joinRoom(client, room, config = {}) {
  const channel = client.channel(room, { config })
  const log = new EventLog(`broadcasts on ${room}`)
  channel.on('broadcast', { event: '*' }, (msg) => log.push(msg))
  await subscribed(channel)
  return { channel, log }
}

test('vsn 2 to vsn 2: binary kind 3 in, kind 4 out, sender excluded', async () => {
  const room = `b-v2-${sfx}`
  const a = binaryRecorder()
  const b = binaryRecorder()
  const A = await joinRoom(newClient(mintToken(), { realtime: { transport: a.transport } }), room)
  const B = await joinRoom(newClient(mintToken(), { realtime: { transport: b.transport } }), room)
  assert.equal(await A.channel.send({ type: 'broadcast', event: 'cursor', payload: { x: 1, y: [2, 3] } }), 'ok')
  const [got] = await B.log.count(1)
  assert.deepEqual(got, { type: 'broadcast', event: 'cursor', payload: { x: 1, y: [2, 3] } })
  assert.ok(a.record.sent.some((f) => f[0] === 3), 'the sender used a binary kind 3 frame')
  assert.ok(b.record.received.some((f) => f[0] === 4), 'the receiver got a binary kind 4 frame')
  // Fence: B answers; once A has B's answer, A would already have had its own message.
  await B.channel.send({ type: 'broadcast', event: 'fence', payload: {} })
  await A.log.find((m) => m.event === 'fence')
  assert.deepEqual(A.log.items.map((m) => m.event), ['fence'])
})

test('vsn 1 and vsn 2 clients exchange JSON broadcasts', async () => {
  const room = `b-mixed-${sfx}`
  const V2 = await joinRoom(newClient(mintToken(), { realtime: { vsn: '2.0.0' } }), room)
  const V1 = await joinRoom(newClient(mintToken(), { realtime: { vsn: '1.0.0' } }), room)
  await V2.channel.send({ type: 'broadcast', event: 'from-v2', payload: { n: 2, s: 'é"x' } })
  const [m1] = await V1.log.count(1)
  assert.deepEqual(m1, { type: 'broadcast', event: 'from-v2', payload: { n: 2, s: 'é"x' } })
  await V1.channel.send({ type: 'broadcast', event: 'from-v1', payload: { n: 1 } })
  const [m2] = await V2.log.count(1)
  assert.deepEqual(m2, { type: 'broadcast', event: 'from-v1', payload: { n: 1 } })
})

test('binary payloads reach vsn 2 clients only', async () => {
  const room = `b-bin-${sfx}`
  const S = await joinRoom(newClient(mintToken()), room)
  const V2 = await joinRoom(newClient(mintToken()), room)
  const V1 = await joinRoom(newClient(mintToken(), { realtime: { vsn: '1.0.0' } }), room)
  const bytes = new Uint8Array([0, 1, 2, 250, 255])
  await S.channel.send({ type: 'broadcast', event: 'blob', payload: bytes.buffer })
  await S.channel.send({ type: 'broadcast', event: 'fence', payload: { after: 'blob' } })
  const [blob, fence] = await V2.log.count(2)
  assert.equal(blob.event, 'blob')
  assert.ok(blob.payload instanceof ArrayBuffer, `payload is an ArrayBuffer: ${typeof blob.payload}`)
  assert.deepEqual([...new Uint8Array(blob.payload)], [...bytes])
  assert.equal(fence.event, 'fence')
  await V1.log.find((m) => m.event === 'fence')
  assert.deepEqual(V1.log.items.map((m) => m.event), ['fence'])
})

test('self and ack', async () => {
  const room = `b-self-${sfx}`
  const A = await joinRoom(newClient(mintToken()), room, { broadcast: { self: true, ack: true } })
  const result = await A.channel.send({ type: 'broadcast', event: 'echo', payload: { me: true } })
  assert.equal(result, 'ok')
  const [own] = await A.log.count(1)
  assert.deepEqual(own, { type: 'broadcast', event: 'echo', payload: { me: true } })
})

test('an oversized broadcast is refused with payload_size_exceeded (ack)', async () => {
  const room = `realtime:b-big-${sfx}`
  const raw = await rawConnect({ token: mintToken(), vsn: '2.0.0' })
  raw.send(['1', '1', room, 'phx_join', { config: { broadcast: { ack: true, self: true } } }])
  await raw.next((f) => f[3] === 'phx_reply' && f[1] === '1', 'join reply')
  const big = 'x'.repeat(3000 * 1024 + 10)
  raw.send(['1', '2', room, 'broadcast', { type: 'broadcast', event: 'big', payload: { big } }])
  const reply = await raw.next((f) => f[3] === 'phx_reply' && f[1] === '2', 'size reply')
  assert.deepEqual(reply, ['1', '2', room, 'phx_reply', { status: 'error', response: 'payload_size_exceeded' }])
  raw.send(['1', '3', room, 'broadcast', { type: 'broadcast', event: 'small', payload: {} }])
  await raw.next((f) => f[3] === 'phx_reply' && f[1] === '3', 'ack of the small one')
  const delivered = raw.frames.items.filter((f) => Array.isArray(f) && f[3] === 'broadcast')
  assert.deepEqual(delivered.map((f) => f[4].event), ['small'])
  raw.close()
})

test('REST: single endpoint (httpSend) and batch', async () => {
  const room = `b-rest-${sfx}`
  const token = mintToken()
  const client = newClient(token)
  const R = await joinRoom(client, room)
  const V1 = await joinRoom(newClient(mintToken(), { realtime: { vsn: '1.0.0' } }), room)
  const sender = newClient(token).channel(room)
  const sent = await sender.httpSend('single', { via: 'http' })
  assert.deepEqual(sent, { success: true })
  const [single] = await R.log.count(1)
  assert.deepEqual(single, { type: 'broadcast', event: 'single', payload: { via: 'http' } })
  const [singleV1] = await V1.log.count(1)
  assert.deepEqual(singleV1, { type: 'broadcast', event: 'single', payload: { via: 'http' } })

  const res = await fetch(`${env.http}/api/broadcast`, {
    method: 'POST',
    headers: { apikey: token, 'content-type': 'application/json' },
    body: JSON.stringify({
      messages: [
        { topic: room, event: 'b1', payload: { i: 1 } },
        { topic: room, event: 'b2', payload: { i: 2 }, id: 'abc' },
      ],
    }),
  })
  assert.equal(res.status, 202)
  assert.equal(res.headers.get('access-control-allow-origin'), '*')
  assert.equal(await res.text(), '')
  const got = await R.log.count(3)
  assert.deepEqual(got.slice(1), [
    { type: 'broadcast', event: 'b1', payload: { i: 1 } },
    { type: 'broadcast', event: 'b2', payload: { i: 2 }, meta: { id: 'abc' } },
  ])
  // Also under /realtime/v1, with a Bearer token.
  const res2 = await fetch(`${env.http}/realtime/v1/api/broadcast`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ topic: room, event: 'b3', payload: {} }] }),
  })
  assert.equal(res2.status, 202)
  await R.log.find((m) => m.event === 'b3')
})

test('REST refusals: 401, 403 (private), 415, 422', async () => {
  const room = `b-refuse-${sfx}`
  const url = `${env.http}/api/broadcast`
  const body = JSON.stringify({ messages: [{ topic: room, event: 'e', payload: {} }] })
  const json = { 'content-type': 'application/json' }
  let r = await fetch(url, { method: 'POST', headers: json, body })
  assert.equal(r.status, 401)
  assert.deepEqual(await r.json(), { message: 'Unauthorized' })
  r = await fetch(url, { method: 'POST', headers: { ...json, apikey: mintToken({ expiresIn: -10 }) }, body })
  assert.equal(r.status, 401)
  const token = mintToken()
  r = await fetch(`${env.http}/api/broadcast/${room}/events/e`, {
    method: 'POST', headers: { apikey: token, 'content-type': 'text/plain' }, body: 'hi',
  })
  assert.equal(r.status, 415)
  r = await fetch(url, {
    method: 'POST', headers: { ...json, apikey: token },
    body: JSON.stringify({ messages: [{ topic: room, event: 'e', payload: [1] }] }),
  })
  assert.equal(r.status, 422)
  assert.ok((await r.json()).errors, '422 carries errors')
  r = await fetch(url, {
    method: 'POST', headers: { ...json, apikey: token },
    body: JSON.stringify({ messages: [{ topic: room, event: 'e', payload: { big: 'x'.repeat(3000 * 1024 + 1) } }] }),
  })
  assert.equal(r.status, 422)
  assert.match(JSON.stringify(await r.json()), /Payload size exceeds tenant limit/)
  // A private topic is never written without a write policy allowing it.
  r = await fetch(`${env.http}/api/broadcast/${room}/events/e?private=true`, {
    method: 'POST', headers: { ...json, apikey: token }, body: '{}',
  })
  assert.equal(r.status, 403)
  r = await fetch(url, { method: 'OPTIONS' })
  assert.equal(r.status, 204)
  assert.equal(r.headers.get('access-control-allow-origin'), '*')
})

test('realtime.send: delivered on commit, never on rollback', async () => {
  const room = `b-sql-${sfx}`
  const V2 = await joinRoom(newClient(mintToken()), room)
  const V1 = await joinRoom(newClient(mintToken(), { realtime: { vsn: '1.0.0' } }), room)
  await sql(`BEGIN; SELECT realtime.send('{"step":"rolled back"}', 'lost', '${room}', false); ROLLBACK`)
  await sql(`BEGIN; SELECT realtime.send('{"step":1}', 'kept', '${room}', false); COMMIT`)
  for (const log of [V2.log, V1.log]) {
    const [m] = await log.count(1)
    assert.equal(m.type, 'broadcast')
    assert.equal(m.event, 'kept', `the rolled-back send never arrives: ${JSON.stringify(log.items)}`)
    assert.match(m.meta.id, /^[0-9a-f-]{36}$/)
    assert.deepEqual(m.payload, { step: 1, id: m.meta.id })
  }
  // broadcast_changes from a trigger.
  const table = `bc_${sfx}`
  await sql(`CREATE TABLE public.${table} (id int PRIMARY KEY, v text)`)
  await sql(`CREATE FUNCTION public.${table}_tg() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM realtime.broadcast_changes('${room}', TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
      RETURN NULL;
    END $$`)
  await sql(`CREATE TRIGGER t AFTER INSERT OR UPDATE ON public.${table} FOR EACH ROW EXECUTE FUNCTION public.${table}_tg()`)
  await sql(`INSERT INTO public.${table} VALUES (1, 'a')`)
  // broadcast_changes is private by default, like the reference: public subscribers get nothing.
  await sql(`SELECT realtime.send('{}', 'fence', '${room}', false)`)
  const got = await V2.log.find((m) => m.event === 'fence')
  assert.ok(got)
  assert.deepEqual(V2.log.items.map((m) => m.event), ['kept', 'fence'])
})

test('realtime.broadcast_changes payload shape (emitted message)', async () => {
  // The helper's payload, checked at the source: the logical message it emits.
  const table = `bcs_${sfx}`
  await sql(`CREATE TABLE public.${table} (id int PRIMARY KEY, v text)`)
  const { rows } = await sql(`
    WITH ins AS (INSERT INTO public.${table} VALUES (7, 'x') RETURNING *)
    SELECT to_jsonb(ins) AS r FROM ins`)
  assert.deepEqual(rows[0].r, { id: 7, v: 'x' })
  const fn = await sql(`SELECT pg_get_function_identity_arguments('realtime.broadcast_changes'::regproc) AS a`)
  assert.equal(
    fn.rows[0].a,
    'topic_name text, event_name text, operation text, table_name text, table_schema text, new record, old record, level text',
  )
})

test('unjoined topics get unmatched topic', async () => {
  const raw = await rawConnect({ token: mintToken(), vsn: '2.0.0' })
  raw.send([null, '9', `realtime:nobody-${sfx}`, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }])
  const reply = await raw.next((f) => f[1] === '9', 'reply', WAIT_MS)
  assert.deepEqual(reply[4], { status: 'error', response: { reason: 'unmatched topic' } })
  raw.close()
})
