// Heartbeats: exact reply frames for both serializers, and supabase-js with a 1 s heartbeat
// interval staying connected (every heartbeat answered, channel still delivering).

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, rawConnect, EventLog,
} from './helpers.mjs'

const sfx = suffix()

before(async () => {
  await ensureRoles()
})

after(async () => {
  await closeClients()
  await closeSql()
})

test('vsn 2.0.0 heartbeat reply frame', async () => {
  const sock = await rawConnect({ token: mintToken(), vsn: '2.0.0' })
  try {
    sock.send('[null,"hb1","phoenix","heartbeat",{}]')
    const reply = await sock.next((f) => Array.isArray(f) && f[1] === 'hb1', 'the heartbeat reply')
    assert.deepStrictEqual(reply, [null, 'hb1', 'phoenix', 'phx_reply', { status: 'ok', response: {} }])
  } finally {
    sock.close()
  }
})

test('vsn 1.0.0 heartbeat reply frame', async () => {
  const sock = await rawConnect({ token: mintToken(), vsn: '1.0.0' })
  try {
    sock.send('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"hb2"}')
    const reply = await sock.next((f) => f && f.ref === 'hb2', 'the heartbeat reply')
    assert.deepStrictEqual(reply, {
      topic: 'phoenix',
      event: 'phx_reply',
      payload: { status: 'ok', response: {} },
      ref: 'hb2',
    })
  } finally {
    sock.close()
  }
})

test('no vsn parameter means 1.0.0 frames', async () => {
  const sock = await rawConnect({ token: mintToken(), vsn: null })
  try {
    sock.send('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"hb3","join_ref":null}')
    const reply = await sock.next((f) => f && f.ref === 'hb3', 'the heartbeat reply')
    assert.deepStrictEqual(reply, {
      topic: 'phoenix', event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: 'hb3',
    })
  } finally {
    sock.close()
  }
})

test('supabase-js with heartbeatIntervalMs 1000 stays connected', async () => {
  const table = `hb_${sfx}`
  await createTable(table, 'id int4 PRIMARY KEY')
  const supabase = newClient(mintToken(), { realtime: { heartbeatIntervalMs: 1000 } })
  const beats = new EventLog('heartbeat statuses')
  supabase.realtime.onHeartbeat((status) => beats.push(status))
  const channel = supabase.channel(`hb-${sfx}`)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table })
  const statuses = await subscribed(channel)

  // About five seconds: five answered heartbeats.
  await beats.until((b) => b.filter((s) => s === 'ok').length >= 5, {
    timeout: 15_000,
    what: 'five answered heartbeats',
  })
  assert.deepStrictEqual(beats.items.filter((s) => s !== 'sent' && s !== 'ok'), [], 'no timeout/error/disconnect')
  assert.equal(supabase.realtime.isConnected(), true)
  assert.deepStrictEqual(statuses.items.map((s) => s.status), ['SUBSCRIBED'])

  await sql(`INSERT INTO public."${table}" (id) VALUES (1)`)
  const [e] = await events.count(1)
  assert.deepStrictEqual(e.new, { id: 1 })
})
