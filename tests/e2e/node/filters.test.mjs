// Every filter operator: for each, rows where some match and some don't; exactly the
// matching ones arrive, in commit order. Each channel has a second, unfiltered binding on a
// fence table; one fence row is inserted after the data, so once a channel has seen the
// fence it has seen everything the server was going to send it for the data.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, shape,
} from './helpers.mjs'

const sfx = suffix()
const table = `filters_${sfx}`
const fence = `filters_fence_${sfx}`

// id, n, s, flag. Row 7 is all NULLs: a NULL never matches, not even neq / not.
const ROWS = [
  [1, 10, 'a', true],
  [2, 20, 'b', false],
  [3, 30, 'c', true],
  [4, 40, 'a', false],
  [5, 50, 'b', true],
  [6, 60, 'c', false],
  [7, null, null, null],
]

const CASES = [
  ['n=eq.30', [3]],
  ['n=neq.30', [1, 2, 4, 5, 6]],
  ['n=lt.30', [1, 2]],
  ['n=lte.30', [1, 2, 3]],
  ['n=gt.40', [5, 6]],
  ['n=gte.40', [4, 5, 6]],
  ['s=eq.b', [2, 5]],
  ['s=in.(a,c)', [1, 3, 4, 6]],
  ['n=in.(20,60,70)', [2, 6]],
  ['flag=eq.true', [1, 3, 5]],
  ['n=not.eq.30', [1, 2, 4, 5, 6]],
  ['n=not.lt.30', [3, 4, 5, 6]],
  ['s=not.in.(a,c)', [2, 5]],
  ['n=gt.10,s=eq.a', [4]],
  ['n=gte.20,n=lte.40,s=neq.c', [2, 4]],
  ['id=eq.99', []],
]

let supabase

before(async () => {
  await ensureRoles()
  await createTable(table, 'id int4 PRIMARY KEY, n int4, s text, flag bool')
  await createTable(fence, 'id int4 PRIMARY KEY')
  supabase = newClient(mintToken())
})

after(async () => {
  await closeClients()
  await closeSql()
})

function rowObject([id, n, s, flag]) {
  return { id, n, s, flag }
}

test('INSERT filters: eq, neq, lt, lte, gt, gte, in, not., comma-AND', async () => {
  const subs = []
  for (const [i, [filter, expected]] of CASES.entries()) {
    const channel = supabase.channel(`filters-${i}-${sfx}`)
    const events = listen(channel, { event: 'INSERT', schema: 'public', table, filter })
    const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
    subs.push({ filter, expected, channel, events, fenceEvents })
  }
  await Promise.all(subs.map((s) => subscribed(s.channel)))

  // One transaction per row, so the commit order is the row order.
  for (const [id, n, s, flag] of ROWS) {
    await sql(`INSERT INTO public."${table}" (id, n, s, flag) VALUES ($1, $2, $3, $4)`, [id, n, s, flag])
  }
  await sql(`INSERT INTO public."${fence}" (id) VALUES (1)`)

  for (const { filter, expected, events, fenceEvents } of subs) {
    await fenceEvents.count(1, { what: `the fence row (filter ${filter})` })
    const got = events.items.map((e) => e.new.id)
    assert.deepStrictEqual(got, expected, `filter ${filter}`)
    for (const e of events.items) {
      assert.deepStrictEqual(shape(e, assert), {
        schema: 'public',
        table,
        errors: null,
        eventType: 'INSERT',
        new: rowObject(ROWS.find((r) => r[0] === e.new.id)),
        old: {},
      }, `payload for filter ${filter}`)
    }
  }
})

test('UPDATE filter is evaluated on the new row', async () => {
  const t = `filters_upd_${sfx}`
  await createTable(t, 'id int4 PRIMARY KEY, n int4')
  await sql(`INSERT INTO public."${t}" (id, n) VALUES (1, 1), (2, 2), (3, 3)`)
  const channel = supabase.channel(`filters-upd-${sfx}`)
  const events = listen(channel, { event: 'UPDATE', schema: 'public', table: t, filter: 'n=gte.20' })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(channel)

  await sql(`UPDATE public."${t}" SET n = 10 WHERE id = 1`)
  await sql(`UPDATE public."${t}" SET n = 20 WHERE id = 2`)
  await sql(`UPDATE public."${t}" SET n = 30 WHERE id = 3`)
  await sql(`INSERT INTO public."${fence}" (id) VALUES (2)`)
  await fenceEvents.count(1)
  assert.deepStrictEqual(events.items.map((e) => shape(e, assert)), [
    { schema: 'public', table: t, errors: null, eventType: 'UPDATE', new: { id: 2, n: 20 }, old: { id: 2 } },
    { schema: 'public', table: t, errors: null, eventType: 'UPDATE', new: { id: 3, n: 30 }, old: { id: 3 } },
  ])
})

test('DELETE filter on the primary key under REPLICA IDENTITY DEFAULT', async () => {
  const t = `filters_del_${sfx}`
  await createTable(t, 'id int4 PRIMARY KEY, n int4')
  await sql(`INSERT INTO public."${t}" (id, n) VALUES (1, 1), (2, 2), (3, 3)`)
  const channel = supabase.channel(`filters-del-${sfx}`)
  const events = listen(channel, { event: 'DELETE', schema: 'public', table: t, filter: 'id=eq.2' })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(channel)

  for (const id of [1, 2, 3]) await sql(`DELETE FROM public."${t}" WHERE id = $1`, [id])
  await sql(`INSERT INTO public."${fence}" (id) VALUES (3)`)
  await fenceEvents.count(1)
  assert.deepStrictEqual(events.items.map((e) => shape(e, assert)), [
    { schema: 'public', table: t, errors: null, eventType: 'DELETE', new: {}, old: { id: 2 } },
  ])
})

test('DELETE filter on a non-key column under REPLICA IDENTITY FULL', async () => {
  const t = `filters_delfull_${sfx}`
  await createTable(t, 'id int4 PRIMARY KEY, n int4', { replicaIdentity: 'FULL' })
  await sql(`INSERT INTO public."${t}" (id, n) VALUES (1, 5), (2, 50), (3, 500)`)
  const channel = supabase.channel(`filters-delfull-${sfx}`)
  const events = listen(channel, { event: 'DELETE', schema: 'public', table: t, filter: 'n=gt.10' })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(channel)

  await sql(`DELETE FROM public."${t}"`)
  await sql(`INSERT INTO public."${fence}" (id) VALUES (4)`)
  await fenceEvents.count(1)
  assert.deepStrictEqual(events.items.map((e) => shape(e, assert)), [
    { schema: 'public', table: t, errors: null, eventType: 'DELETE', new: {}, old: { id: 2, n: 50 } },
    { schema: 'public', table: t, errors: null, eventType: 'DELETE', new: {}, old: { id: 3, n: 500 } },
  ])
})
