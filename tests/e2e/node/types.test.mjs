// Column values arrive JSON-typed, as Postgres `to_jsonb` would give them: numbers as
// numbers (with their exact digits on the wire), bool, nested jsonb, arrays, ISO 8601
// timestamps with '+00:00', dates, uuids, bytea as '\x…', NULL as null.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, shape, recordingTransport,
} from './helpers.mjs'

const sfx = suffix()
const table = `types_${sfx}`

const COLUMNS = `
  id int4 PRIMARY KEY,
  big int8,
  num numeric(8,2),
  flag bool,
  doc jsonb,
  tags text[],
  nums int4[],
  at timestamptz,
  day date,
  uid uuid,
  raw bytea,
  nothing text,
  f8 float8,
  ts timestamp`

before(async () => {
  await ensureRoles()
  await createTable(table, COLUMNS)
})

after(async () => {
  await closeClients()
  await closeSql()
})

test('typed values through supabase-js and on the wire', async () => {
  const { transport, record } = recordingTransport()
  const supabase = newClient(mintToken(), { realtime: { transport } })
  const channel = supabase.channel(`types-${sfx}`)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table })
  await subscribed(channel)

  await sql(`INSERT INTO public."${table}"
    (id, big, num, flag, doc, tags, nums, at, day, uid, raw, nothing, f8, ts)
    VALUES (1, 1234567890123, 1.50, true,
            '{"a": 1, "b": [true, null, "x"], "c": {"d": "e"}}',
            ARRAY['a', 'b c', 'd,e'], ARRAY[1, 2, 3],
            '2024-05-06 07:08:09.123456+00', '2024-05-06',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x0102'::bytea, NULL,
            2.5, '2024-05-06 07:08:09')`)
  await sql(`INSERT INTO public."${table}" (id, big, num, flag, tags, nums)
    VALUES (2, 9007199254740993, 12345.67, false, '{}', ARRAY[]::int4[])`)

  const [first, second] = await events.count(2)
  assert.deepStrictEqual(shape(first, assert), {
    schema: 'public',
    table,
    errors: null,
    eventType: 'INSERT',
    old: {},
    new: {
      id: 1,
      big: 1234567890123,
      num: 1.5,
      flag: true,
      doc: { a: 1, b: [true, null, 'x'], c: { d: 'e' } },
      tags: ['a', 'b c', 'd,e'],
      nums: [1, 2, 3],
      at: '2024-05-06T07:08:09.123456+00:00',
      day: '2024-05-06',
      uid: 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
      raw: '\\x0102',
      nothing: null,
      f8: 2.5,
      ts: '2024-05-06T07:08:09',
    },
  })
  assert.equal(second.new.flag, false)
  assert.deepStrictEqual(second.new.tags, [])
  assert.deepStrictEqual(second.new.nums, [])
  assert.equal(second.new.num, 12345.67)
  assert.equal(second.new.doc, null)

  // On the wire the numbers keep their exact digits (never through a float).
  const frame = record.frames.items.find((f) => f.includes('9007199254740993'))
  assert.ok(frame, 'a frame carries the int8 9007199254740993')
  assert.match(frame, /"big":\s*9007199254740993[,}]/)
  assert.match(frame, /"num":\s*12345\.67[,}]/)
  const firstFrame = record.frames.items.find((f) => f.includes('1234567890123'))
  assert.match(firstFrame, /"num":\s*1\.50[,}]/, 'numeric 1.50 keeps its scale on the wire')
  assert.match(firstFrame, /"columns":\s*\[/)
  const columns = JSON.parse(firstFrame)
  const payload = Array.isArray(columns) ? columns[4] : columns.payload
  assert.deepStrictEqual(payload.data.columns, [
    { name: 'id', type: 'int4' },
    { name: 'big', type: 'int8' },
    { name: 'num', type: 'numeric' },
    { name: 'flag', type: 'bool' },
    { name: 'doc', type: 'jsonb' },
    { name: 'tags', type: '_text' },
    { name: 'nums', type: '_int4' },
    { name: 'at', type: 'timestamptz' },
    { name: 'day', type: 'date' },
    { name: 'uid', type: 'uuid' },
    { name: 'raw', type: 'bytea' },
    { name: 'nothing', type: 'text' },
    { name: 'f8', type: 'float8' },
    { name: 'ts', type: 'timestamp' },
  ])
})
