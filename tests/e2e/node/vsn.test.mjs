// The same postgres_changes flow under both serializer versions. realtime-js takes
// `vsn` as a RealtimeClient option (supabase-js passes `realtime: {...}` through); the
// recording transport checks that the socket URL and the frames really use that version.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, shape, recordingTransport,
} from './helpers.mjs'

const sfx = suffix()

before(async () => {
  await ensureRoles()
})

after(async () => {
  await closeClients()
  await closeSql()
})

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`postgres_changes with vsn ${vsn}`, async () => {
    const table = `vsn_${vsn.replace(/\./g, '')}_${sfx}`
    await createTable(table, 'id int4 PRIMARY KEY, body text', { replicaIdentity: 'FULL' })
    const { transport, record } = recordingTransport()
    const supabase = newClient(mintToken(), { realtime: { vsn, transport } })
    const channel = supabase.channel(`vsn-${vsn}-${sfx}`)
    const events = listen(channel, { event: '*', schema: 'public', table })
    await subscribed(channel)

    assert.equal(record.urls.length, 1)
    const url = new URL(record.urls[0])
    assert.equal(url.pathname, '/realtime/v1/websocket')
    assert.equal(url.searchParams.get('vsn'), vsn)

    await sql(`INSERT INTO public."${table}" (id, body) VALUES (7, 'hello')`)
    await sql(`UPDATE public."${table}" SET body = 'world' WHERE id = 7`)
    await sql(`DELETE FROM public."${table}" WHERE id = 7`)
    await events.count(3)
    assert.deepStrictEqual(events.items.map((e) => shape(e, assert)), [
      { schema: 'public', table, errors: null, eventType: 'INSERT', new: { id: 7, body: 'hello' }, old: {} },
      { schema: 'public', table, errors: null, eventType: 'UPDATE', new: { id: 7, body: 'world' }, old: { id: 7, body: 'hello' } },
      { schema: 'public', table, errors: null, eventType: 'DELETE', new: {}, old: { id: 7, body: 'world' } },
    ])

    // Frame format on the wire: objects for 1.0.0, arrays for 2.0.0.
    const frames = record.frames.items.map((f) => JSON.parse(f))
    assert.ok(frames.length >= 4, 'join reply + three changes')
    for (const f of frames) {
      if (vsn === '1.0.0') {
        assert.ok(!Array.isArray(f) && typeof f === 'object', `vsn 1 frame is an object: ${JSON.stringify(f)}`)
        assert.deepStrictEqual(Object.keys(f).sort(), ['event', 'payload', 'ref', 'topic'])
      } else {
        assert.ok(Array.isArray(f) && f.length === 5, `vsn 2 frame is a 5-array: ${JSON.stringify(f)}`)
      }
    }
    const changes = frames
      .map((f) => (Array.isArray(f) ? { join_ref: f[0], ref: f[1], topic: f[2], event: f[3], payload: f[4] } : f))
      .filter((f) => f.event === 'postgres_changes')
    assert.equal(changes.length, 3)
    for (const c of changes) {
      assert.equal(c.topic, `realtime:vsn-${vsn}-${sfx}`)
      assert.equal(c.ref, null)
      if (vsn === '2.0.0') assert.equal(c.join_ref, null)
      assert.ok(Array.isArray(c.payload.ids) && c.payload.ids.length === 1)
      assert.ok(Number.isInteger(c.payload.ids[0]))
      assert.deepStrictEqual(Object.keys(c.payload).sort(), ['data', 'ids'])
    }
    assert.deepStrictEqual(Object.keys(changes[0].payload.data).sort(),
      ['columns', 'commit_timestamp', 'errors', 'record', 'schema', 'table', 'type'])
    assert.deepStrictEqual(Object.keys(changes[1].payload.data).sort(),
      ['columns', 'commit_timestamp', 'errors', 'old_record', 'record', 'schema', 'table', 'type'])
    assert.deepStrictEqual(Object.keys(changes[2].payload.data).sort(),
      ['columns', 'commit_timestamp', 'errors', 'old_record', 'schema', 'table', 'type'])
  })
}
