// 100 channels on one socket, each on its own table: all SUBSCRIBED, and each gets exactly
// the changes of its table.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, newClient, closeClients, mintToken, subscribed, listen, shape,
} from './helpers.mjs'

const sfx = suffix()
const N = 100
const tables = Array.from({ length: N }, (_, i) => `many_${String(i).padStart(3, '0')}_${sfx}`)

before(async () => {
  await ensureRoles()
  const ddl = tables
    .map((t) => `CREATE TABLE public."${t}" (id int4 PRIMARY KEY, v text);
                 GRANT SELECT ON public."${t}" TO anon, authenticated;`)
    .join('\n')
  await sql(ddl)
})

after(async () => {
  await closeClients()
  await closeSql()
})

test(`${N} channels on one socket`, async () => {
  const supabase = newClient(mintToken())
  const subs = tables.map((table, i) => {
    const channel = supabase.channel(`many-${i}-${sfx}`)
    const events = listen(channel, { event: '*', schema: 'public', table })
    return { table, channel, events }
  })
  await Promise.all(subs.map((s) => subscribed(s.channel, { timeout: 20_000 })))
  assert.equal(supabase.getChannels().length, N)

  // One transaction with a row per table, then a second one as the fence.
  await sql(`BEGIN; ${tables.map((t, i) => `INSERT INTO public."${t}" (id, v) VALUES (${i}, 'row ${i}');`).join(' ')} COMMIT;`)
  await sql(`BEGIN; ${tables.map((t) => `INSERT INTO public."${t}" (id, v) VALUES (1000, 'fence');`).join(' ')} COMMIT;`)

  for (const [i, { table, events }] of subs.entries()) {
    await events.until((items) => items.some((e) => e.new.id === 1000), { what: `the fence on ${table}`, timeout: 20_000 })
    assert.deepStrictEqual(events.items.map((e) => shape(e, assert)), [
      { schema: 'public', table, errors: null, eventType: 'INSERT', new: { id: i, v: `row ${i}` }, old: {} },
      { schema: 'public', table, errors: null, eventType: 'INSERT', new: { id: 1000, v: 'fence' }, old: {} },
    ], `channel ${i}`)
  }
})
