// `match` and `imatch` filters (Postgres's ~ and ~*) through the official client's filter
// builder and as raw strings: exactly the rows Postgres's own operator selects arrive (the
// expectation is computed by Postgres, not written by hand), and a pattern walcast does not
// evaluate is refused at join with its reason. A fence row on an unfiltered binding proves
// that nothing more was on its way.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { postgresChangesFilter } from '@supabase/supabase-js'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribed, listen, collectSystem,
} from './helpers.mjs'

const sfx = suffix()
const table = `regex_${sfx}`
const fence = `regex_fence_${sfx}`

const VALUES = [
  'apple', 'Apple pie', 'banana', 'cherry', 'a1z', 'abcz', 'ABCZ', 'zzz', 'post-42', 'Post-7',
  'foo bar', 'foobar', 'café', 'CAFÉ', 'line1\nline2', '', 'a{2}', null,
]

// [filter, SQL condition Postgres evaluates for the expectation]
const CASES = [
  [postgresChangesFilter().match('s', '^a.*z$'), `s ~ '^a.*z$'`],
  [postgresChangesFilter().imatch('s', '^apple'), `s ~* '^apple'`],
  [postgresChangesFilter().match('s', '^(apple|banana)$'), `s ~ '^(apple|banana)$'`],
  [postgresChangesFilter().match('s', '^[[:alpha:]]+$'), `s ~ '^[[:alpha:]]+$'`],
  [postgresChangesFilter().match('s', '\\mbar\\M'), `s ~ '\\mbar\\M'`],
  [postgresChangesFilter().imatch('s', '^post-\\d{1,2}$'), `s ~* '^post-\\d{1,2}$'`],
  [postgresChangesFilter().imatch('s', 'é'), `s ~* 'é'`],
  [postgresChangesFilter().match('s', '1.l'), `s ~ '1.l'`],
  [postgresChangesFilter().not('s', 'match', '^a'), `NOT (s ~ '^a')`],
  [postgresChangesFilter().match('s', 'a{,2}'), `s ~ 'a{,2}'`],
  ['s=match.an', `s ~ 'an'`],
  ['s=imatch.^CHERRY$,id=gt.0', `s ~* '^CHERRY$' AND id > 0`],
]

let supabase

before(async () => {
  await ensureRoles()
  await createTable(table, 'id int4 PRIMARY KEY, s text')
  await createTable(fence, 'id int4 PRIMARY KEY')
  supabase = newClient(mintToken())
})

after(async () => {
  await closeClients()
  await closeSql()
})

test('match and imatch deliver exactly the rows Postgres selects', async () => {
  const subs = []
  for (const [i, [filter, condition]] of CASES.entries()) {
    const channel = supabase.channel(`regex-${i}-${sfx}`)
    const events = listen(channel, { event: 'INSERT', schema: 'public', table, filter })
    const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
    subs.push({ filter: String(filter.build?.() ?? filter), condition, channel, events, fenceEvents })
  }
  await Promise.all(subs.map((s) => subscribed(s.channel)))

  for (const [i, s] of VALUES.entries()) {
    await sql(`INSERT INTO public."${table}" (id, s) VALUES ($1, $2)`, [i + 1, s])
  }
  await sql(`INSERT INTO public."${fence}" (id) VALUES (1)`)

  for (const { filter, condition, events, fenceEvents } of subs) {
    const { rows } = await sql(
      `SELECT id FROM public."${table}" WHERE COALESCE(${condition}, false) ORDER BY id`,
    )
    const expected = rows.map((r) => r.id)
    await fenceEvents.count(1, { what: `the fence row (filter ${filter})` })
    assert.deepStrictEqual(events.items.map((e) => e.new.id), expected, `filter ${filter}`)
  }
  // The cases are not vacuous: most select some rows and none selects all.
  const counts = await Promise.all(
    subs.map(async (s) => (await sql(`SELECT count(*)::int AS n FROM public."${table}" WHERE COALESCE(${s.condition}, false)`)).rows[0].n),
  )
  assert.ok(counts.filter((n) => n > 0).length >= CASES.length - 1, `counts ${counts}`)
  assert.ok(counts.every((n) => n < VALUES.length), `counts ${counts}`)
})

test('a pattern walcast does not evaluate is refused at join with its reason', async () => {
  const cases = [
    [postgresChangesFilter().match('s', '(a)\\1'), /is not supported: back-references/],
    [postgresChangesFilter().match('s', 'a(?=b)'), /is not supported: lookahead and lookbehind/],
    [postgresChangesFilter().match('s', 'a('), /invalid regular expression `a\(`: parentheses \(\) not balanced/],
    [postgresChangesFilter().imatch('id', '^1'), /match and imatch need a text, varchar or name column/],
  ]
  for (const [i, [filter, reason]] of cases.entries()) {
    const channel = supabase.channel(`regex-bad-${i}-${sfx}`)
    const system = collectSystem(channel)
    listen(channel, { event: 'INSERT', schema: 'public', table, filter })
    await subscribed(channel)
    const msg = await system.find((m) => m.status === 'error', { what: `the refusal of ${filter.build()}` })
    assert.equal(msg.extension, 'postgres_changes')
    assert.match(msg.message, /^Unable to subscribe to changes with given parameters/)
    assert.match(msg.message, reason)
  }
})
