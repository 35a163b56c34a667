// Wildcard bindings (table '*', schema without table) and channels with several bindings.
// Other test files write to public tables at the same time, so wildcard assertions look
// only at this file's tables.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, shape,
} from './helpers.mjs'

const sfx = suffix()
let supabase

before(async () => {
  await ensureRoles()
  supabase = newClient(mintToken())
})

after(async () => {
  await closeClients()
  await closeSql()
})

async function wildcardCase(name, binding) {
  const t1 = `wild_${name}_a_${sfx}`
  const t2 = `wild_${name}_b_${sfx}`
  await createTable(t1, 'id int4 PRIMARY KEY, v text')
  await createTable(t2, 'id int4 PRIMARY KEY, v text')
  const channel = supabase.channel(`wild-${name}-${sfx}`)
  const all = listen(channel, binding)
  await subscribed(channel)

  await sql(`INSERT INTO public."${t1}" (id, v) VALUES (1, 'one')`)
  await sql(`UPDATE public."${t1}" SET v = 'uno' WHERE id = 1`)
  await sql(`INSERT INTO public."${t2}" (id, v) VALUES (2, 'two')`)
  await sql(`DELETE FROM public."${t2}" WHERE id = 2`)

  const ours = (items) => items.filter((e) => e.table === t1 || e.table === t2)
  await all.until((items) => ours(items).length >= 4, { what: 'four changes on our tables' })
  assert.deepStrictEqual(ours(all.items).map((e) => shape(e, assert)), [
    { schema: 'public', table: t1, errors: null, eventType: 'INSERT', new: { id: 1, v: 'one' }, old: {} },
    { schema: 'public', table: t1, errors: null, eventType: 'UPDATE', new: { id: 1, v: 'uno' }, old: { id: 1 } },
    { schema: 'public', table: t2, errors: null, eventType: 'INSERT', new: { id: 2, v: 'two' }, old: {} },
    { schema: 'public', table: t2, errors: null, eventType: 'DELETE', new: {}, old: { id: 2 } },
  ])
  for (const e of all.items) assert.equal(e.schema, 'public', 'wildcard stays inside schema public')
}

test("schema 'public', table '*' receives changes of every table", async () => {
  await wildcardCase('star', { event: '*', schema: 'public', table: '*' })
})

test("schema 'public' without a table receives changes of every table", async () => {
  await wildcardCase('schema', { event: '*', schema: 'public' })
})

test('two bindings on two tables: INSERT on one, DELETE on the other', async () => {
  const ta = `multi_a_${sfx}`
  const tb = `multi_b_${sfx}`
  await createTable(ta, 'id int4 PRIMARY KEY, v text')
  await createTable(tb, 'id int4 PRIMARY KEY, v text')
  const channel = supabase.channel(`multi-${sfx}`)
  const insertsA = listen(channel, { event: 'INSERT', schema: 'public', table: ta })
  const deletesB = listen(channel, { event: 'DELETE', schema: 'public', table: tb })
  await subscribed(channel)

  await sql(`INSERT INTO public."${ta}" (id, v) VALUES (1, 'a1')`)
  await sql(`INSERT INTO public."${tb}" (id, v) VALUES (1, 'b1')`)
  await sql(`DELETE FROM public."${tb}" WHERE id = 1`)
  await sql(`DELETE FROM public."${ta}" WHERE id = 1`)
  await sql(`INSERT INTO public."${ta}" (id, v) VALUES (2, 'a2')`) // the fence

  await insertsA.count(2)
  assert.deepStrictEqual(insertsA.items.map((e) => shape(e, assert)), [
    { schema: 'public', table: ta, errors: null, eventType: 'INSERT', new: { id: 1, v: 'a1' }, old: {} },
    { schema: 'public', table: ta, errors: null, eventType: 'INSERT', new: { id: 2, v: 'a2' }, old: {} },
  ])
  assert.deepStrictEqual(deletesB.items.map((e) => shape(e, assert)), [
    { schema: 'public', table: tb, errors: null, eventType: 'DELETE', new: {}, old: { id: 1 } },
  ])
})

test('a change matching two bindings of one channel reaches both callbacks once', async () => {
  const t = `multi_same_${sfx}`
  await createTable(t, 'id int4 PRIMARY KEY, v text')
  const channel = supabase.channel(`multi-same-${sfx}`)
  const every = listen(channel, { event: '*', schema: 'public', table: t })
  const onlyOne = listen(channel, { event: 'INSERT', schema: 'public', table: t, filter: 'id=eq.1' })
  await subscribed(channel)

  await sql(`INSERT INTO public."${t}" (id, v) VALUES (1, 'both')`)
  await sql(`INSERT INTO public."${t}" (id, v) VALUES (2, 'first only')`)
  await every.count(2)

  assert.deepStrictEqual(every.items.map((e) => e.new), [{ id: 1, v: 'both' }, { id: 2, v: 'first only' }])
  assert.equal(every.length, 2, 'the wildcard binding sees each change once')
  assert.deepStrictEqual(onlyOne.items.map((e) => shape(e, assert)), [
    { schema: 'public', table: t, errors: null, eventType: 'INSERT', new: { id: 1, v: 'both' }, old: {} },
  ])
})
