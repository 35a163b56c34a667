// A 2,000-row transaction is delivered complete, once, and in order.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, COMMIT_TS,
} from './helpers.mjs'

const sfx = suffix()
const table = `bigtx_${sfx}`
const ROWS = 2000

before(async () => {
  await ensureRoles()
  await createTable(table, 'id int4 PRIMARY KEY, label text NOT NULL')
})

after(async () => {
  await closeClients()
  await closeSql()
})

test(`${ROWS}-row transaction arrives complete and in order`, async () => {
  const supabase = newClient(mintToken())
  const channel = supabase.channel(`bigtx-${sfx}`)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table })
  await subscribed(channel)

  await sql(`INSERT INTO public."${table}" (id, label)
             SELECT g, 'row ' || g FROM generate_series(1, ${ROWS}) AS g`)
  await sql(`INSERT INTO public."${table}" (id, label) VALUES (${ROWS + 1}, 'fence')`)
  await events.until((items) => items.some((e) => e.new.id === ROWS + 1), {
    timeout: 60_000,
    what: 'the fence row after the big transaction',
  })

  const ids = events.items.map((e) => e.new.id)
  assert.equal(ids.length, ROWS + 1, 'no missing or duplicate rows')
  for (let i = 0; i < ids.length; i++) {
    if (ids[i] !== i + 1) assert.fail(`position ${i}: expected id ${i + 1}, got ${ids[i]}`)
  }
  const first = events.items[0]
  const ts = first.commit_timestamp
  assert.match(ts, COMMIT_TS)
  for (const e of events.items.slice(0, ROWS)) {
    assert.equal(e.commit_timestamp, ts, 'one transaction, one commit timestamp')
    assert.equal(e.eventType, 'INSERT')
    assert.equal(e.table, table)
    assert.deepStrictEqual(e.new, { id: e.new.id, label: `row ${e.new.id}` })
  }
})
