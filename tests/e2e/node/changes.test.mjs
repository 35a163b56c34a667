// INSERT / UPDATE / DELETE through supabase-js, under REPLICA IDENTITY DEFAULT (old = primary
// key only) and FULL (old = the whole previous row), with event '*' and with one binding
// per event type.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, shape,
} from './helpers.mjs'

const sfx = suffix()

before(async () => {
  await ensureRoles()
})

after(async () => {
  await closeClients()
  await closeSql()
})

async function runCrud(table) {
  await sql(`INSERT INTO public."${table}" (id, title, n) VALUES (1, 'first', 10)`)
  await sql(`UPDATE public."${table}" SET title = 'second' WHERE id = 1`)
  await sql(`DELETE FROM public."${table}" WHERE id = 1`)
}

for (const identity of ['DEFAULT', 'FULL']) {
  test(`INSERT/UPDATE/DELETE with event '*' under REPLICA IDENTITY ${identity}`, async () => {
    const table = `crud_all_${identity.toLowerCase()}_${sfx}`
    await createTable(table, 'id int4 PRIMARY KEY, title text NOT NULL, n int4', {
      replicaIdentity: identity,
    })
    const supabase = newClient(mintToken())
    const channel = supabase.channel(`crud-all-${identity}-${sfx}`)
    const events = listen(channel, { event: '*', schema: 'public', table })
    await subscribed(channel)

    await runCrud(table)
    const [ins, upd, del] = await events.count(3)

    const base = { schema: 'public', table, errors: null }
    assert.deepStrictEqual(shape(ins, assert), {
      ...base,
      eventType: 'INSERT',
      new: { id: 1, title: 'first', n: 10 },
      old: {},
    })
    assert.deepStrictEqual(shape(upd, assert), {
      ...base,
      eventType: 'UPDATE',
      new: { id: 1, title: 'second', n: 10 },
      old: identity === 'FULL' ? { id: 1, title: 'first', n: 10 } : { id: 1 },
    })
    assert.deepStrictEqual(shape(del, assert), {
      ...base,
      eventType: 'DELETE',
      new: {},
      old: identity === 'FULL' ? { id: 1, title: 'second', n: 10 } : { id: 1 },
    })
    // Commit timestamps follow commit order.
    assert.ok(ins.commit_timestamp <= upd.commit_timestamp && upd.commit_timestamp <= del.commit_timestamp)
    assert.equal(events.length, 3, 'exactly three changes')
  })
}

test('one binding per event type receives only its own events', async () => {
  const table = `crud_each_${sfx}`
  await createTable(table, 'id int4 PRIMARY KEY, title text NOT NULL, n int4', {
    replicaIdentity: 'FULL',
  })
  const supabase = newClient(mintToken({ role: 'authenticated', claims: { sub: 'user-1' } }))
  const channel = supabase.channel(`crud-each-${sfx}`)
  const inserts = listen(channel, { event: 'INSERT', schema: 'public', table })
  const updates = listen(channel, { event: 'UPDATE', schema: 'public', table })
  const deletes = listen(channel, { event: 'DELETE', schema: 'public', table })
  await subscribed(channel)

  await runCrud(table)
  // The DELETE is the last change; once it is in, the others had their chance.
  const [del] = await deletes.count(1)

  assert.equal(inserts.length, 1, 'one INSERT')
  assert.equal(updates.length, 1, 'one UPDATE')
  assert.equal(deletes.length, 1, 'one DELETE')
  assert.deepStrictEqual(shape(inserts.items[0], assert), {
    schema: 'public', table, errors: null, eventType: 'INSERT',
    new: { id: 1, title: 'first', n: 10 }, old: {},
  })
  assert.deepStrictEqual(shape(updates.items[0], assert), {
    schema: 'public', table, errors: null, eventType: 'UPDATE',
    new: { id: 1, title: 'second', n: 10 }, old: { id: 1, title: 'first', n: 10 },
  })
  assert.deepStrictEqual(shape(del, assert), {
    schema: 'public', table, errors: null, eventType: 'DELETE',
    new: {}, old: { id: 1, title: 'second', n: 10 },
  })
})

test('UPDATE that changes the primary key under DEFAULT carries the old key', async () => {
  const table = `crud_pk_${sfx}`
  await createTable(table, 'id int4 PRIMARY KEY, title text NOT NULL, n int4')
  const supabase = newClient(mintToken())
  const channel = supabase.channel(`crud-pk-${sfx}`)
  const events = listen(channel, { event: 'UPDATE', schema: 'public', table })
  await subscribed(channel)

  await sql(`INSERT INTO public."${table}" (id, title, n) VALUES (1, 'a', NULL)`)
  await sql(`UPDATE public."${table}" SET id = 2 WHERE id = 1`)
  const [upd] = await events.count(1)
  assert.deepStrictEqual(shape(upd, assert), {
    schema: 'public', table, errors: null, eventType: 'UPDATE',
    new: { id: 2, title: 'a', n: null }, old: { id: 1 },
  })
})
