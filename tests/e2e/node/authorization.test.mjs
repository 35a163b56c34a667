// Authorization of postgres_changes: a table with row-level security enabled and no policy
// delivers nothing; a role without SELECT on the table gets a postgres_changes system error
// and nothing else. A second binding on a readable fence table proves the absence.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribe, subscribed, listen, collectSystem,
} from './helpers.mjs'

const sfx = suffix()
const fence = `authz_fence_${sfx}`
const noSelectRole = `e2e_noselect_${sfx}`

before(async () => {
  await ensureRoles(noSelectRole)
  await createTable(fence, 'id int4 PRIMARY KEY')
  await sql(`GRANT SELECT ON public."${fence}" TO "${noSelectRole}"`)
})

after(async () => {
  await closeClients()
  await closeSql()
})

test('a table with RLS enabled and no policy delivers nothing', async () => {
  const table = `authz_rls_${sfx}`
  await createTable(table, 'id int4 PRIMARY KEY, secret text')
  await sql(`ALTER TABLE public."${table}" ENABLE ROW LEVEL SECURITY`)
  const supabase = newClient(mintToken({ role: 'authenticated', claims: { sub: 'u-rls' } }))
  const channel = supabase.channel(`authz-rls-${sfx}`)
  const hidden = listen(channel, { event: '*', schema: 'public', table })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(channel)

  await sql(`INSERT INTO public."${table}" (id, secret) VALUES (1, 'hidden')`)
  await sql(`UPDATE public."${table}" SET secret = 'still hidden' WHERE id = 1`)
  await sql(`INSERT INTO public."${fence}" (id) VALUES (1)`)
  await fenceEvents.count(1)
  assert.deepStrictEqual(hidden.items, [], 'no change of the RLS table was delivered')
})

test('a role without SELECT on the table gets a system error and no changes', async () => {
  const table = `authz_nosel_${sfx}`
  await createTable(table, 'id int4 PRIMARY KEY, v text') // granted to anon/authenticated only
  const supabase = newClient(mintToken({ role: noSelectRole }))
  const name = `authz-nosel-${sfx}`
  const channel = supabase.channel(name)
  const system = collectSystem(channel)
  const denied = listen(channel, { event: '*', schema: 'public', table })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  const { statuses } = subscribe(channel)
  // Whether the join itself is accepted is up to the server; the system error is not.
  await statuses.count(1)

  await sql(`INSERT INTO public."${table}" (id, v) VALUES (1, 'x')`)
  await sql(`INSERT INTO public."${fence}" (id) VALUES (2)`)
  const err = await system.find((m) => m.status === 'error', { what: 'a postgres_changes system error' })
  assert.equal(err.extension, 'postgres_changes')
  assert.equal(err.channel, name)
  assert.equal(typeof err.message, 'string')
  assert.ok(err.message.length > 0)
  if (statuses.items[0].status === 'SUBSCRIBED') {
    await fenceEvents.count(1)
  }
  assert.deepStrictEqual(denied.items, [], 'no change of the unreadable table was delivered')
})
