// Row-level security on postgres_changes and private channels, with the official client:
// two users on one table each see only their rows; anon sees nothing from an
// authenticated-only table; refreshing a token to another user changes what is delivered;
// a private channel without a read policy is refused. Fence rows on a table readable by
// everyone prove absences (a change committed later was delivered, so earlier ones would
// have been too).

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribe, subscribed, listen, collectSystem,
} from './helpers.mjs'

const sfx = suffix()
const notes = `rls_notes_${sfx}`
const staff = `rls_staff_${sfx}`
const fence = `rls_fence_${sfx}`

before(async () => {
  await ensureRoles()
  await createTable(fence, 'id int4 PRIMARY KEY')
  // Policies written for Supabase: the owner column against the token's sub.
  await createTable(notes, 'id int4 PRIMARY KEY, owner text, body text')
  await sql(`ALTER TABLE public."${notes}" ENABLE ROW LEVEL SECURITY`)
  await sql(`CREATE POLICY own_notes ON public."${notes}" FOR SELECT TO authenticated
             USING (owner = current_setting('request.jwt.claim.sub', true))`)
  await createTable(staff, 'id int4 PRIMARY KEY, v text')
  await sql(`ALTER TABLE public."${staff}" ENABLE ROW LEVEL SECURITY`)
  await sql(`CREATE POLICY staff_only ON public."${staff}" FOR SELECT TO authenticated USING (true)`)
})

after(async () => {
  await closeClients()
  await closeSql()
})

const rows = (log) => log.items.map((e) => e.new)

test('two users on one table each see only their rows', async () => {
  const channels = []
  for (const user of ['alice', 'bob']) {
    const supabase = newClient(mintToken({ role: 'authenticated', claims: { sub: user } }))
    const channel = supabase.channel(`rls-own-${user}-${sfx}`)
    const events = listen(channel, { event: 'INSERT', schema: 'public', table: notes })
    const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
    await subscribed(channel)
    channels.push({ events, fenceEvents })
  }
  await sql(`INSERT INTO public."${notes}" VALUES (1, 'alice', 'a1'), (2, 'bob', 'b1')`)
  await sql(`INSERT INTO public."${notes}" VALUES (3, 'alice', 'a2')`)
  await sql(`INSERT INTO public."${fence}" VALUES (1)`)
  for (const c of channels) await c.fenceEvents.count(1)
  assert.deepStrictEqual(rows(channels[0].events), [
    { id: 1, owner: 'alice', body: 'a1' },
    { id: 3, owner: 'alice', body: 'a2' },
  ])
  assert.deepStrictEqual(rows(channels[1].events), [{ id: 2, owner: 'bob', body: 'b1' }])
})

test('anon sees nothing from an authenticated-only table', async () => {
  const anon = newClient(mintToken({ role: 'anon' }))
  const a = anon.channel(`rls-anon-${sfx}`)
  const anonEvents = listen(a, { event: '*', schema: 'public', table: staff })
  const anonFence = listen(a, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(a)
  const user = newClient(mintToken({ role: 'authenticated', claims: { sub: 'carol' } }))
  const u = user.channel(`rls-staff-${sfx}`)
  const userEvents = listen(u, { event: '*', schema: 'public', table: staff })
  await subscribed(u)

  await sql(`INSERT INTO public."${staff}" VALUES (1, 'internal')`)
  await sql(`INSERT INTO public."${fence}" VALUES (2)`)
  await userEvents.count(1)
  await anonFence.count(1)
  assert.deepStrictEqual(rows(userEvents), [{ id: 1, v: 'internal' }])
  assert.deepStrictEqual(anonEvents.items, [], 'anon received nothing from the staff table')
})

test('refreshing the token to another user changes what is delivered', async () => {
  const supabase = newClient(mintToken({ role: 'authenticated', claims: { sub: 'dave' } }))
  const channel = supabase.channel(`rls-refresh-${sfx}`)
  const system = collectSystem(channel)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table: notes })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(channel)

  // A token change travels on the socket while changes flow; probe until it is in place.
  const until = async (owner, from) => {
    for (let n = from; ; n += 1) {
      assert.ok(n < from + 40, `rows of ${owner} never arrived`)
      await sql(`INSERT INTO public."${notes}" VALUES (${n}, '${owner}', 'probe'), (${n + 1000}, 'nobody', 'x')`)
      await sql(`INSERT INTO public."${fence}" VALUES (${n})`)
      await fenceEvents.find((e) => e.new.id === n)
      if (events.items.some((e) => e.new.owner === owner)) return
    }
  }
  await until('dave', 10)

  await supabase.realtime.setAuth(mintToken({ role: 'authenticated', claims: { sub: 'erin' } }))
  await until('erin', 50)
  await sql(`INSERT INTO public."${notes}" VALUES (200, 'dave', 'd2'), (201, 'erin', 'e2')`)
  await sql(`INSERT INTO public."${fence}" VALUES (200)`)
  await fenceEvents.find((e) => e.new.id === 200)
  const owners = rows(events).map((r) => r.owner)
  assert.equal(owners[0], 'dave')
  const switched = owners.indexOf('erin')
  assert.ok(owners.slice(0, switched).every((o) => o === 'dave'), `dave only before: ${owners}`)
  assert.ok(owners.slice(switched).every((o) => o === 'erin'), `erin only after: ${owners}`)
  assert.equal(rows(events).at(-1).id, 201)
  assert.deepStrictEqual(system.items.filter((m) => m.status === 'error'), [])
})

test('a private channel without a read policy is refused', async () => {
  const supabase = newClient(mintToken({ role: 'authenticated', claims: { sub: 'frank' } }))
  const name = `rls-private-${sfx}`
  const channel = supabase.channel(name, { config: { private: true } })
  const { statuses, subscribed: ok } = subscribe(channel)
  ok.catch(() => {})
  const first = await statuses.find(() => true)
  assert.equal(first.status, 'CHANNEL_ERROR')
  assert.match(
    first.error ?? '',
    new RegExp(`Unauthorized: You do not have permissions to read from this Channel topic: ${name}`),
  )
})

test('a private channel with a read policy for its topic is joined', async () => {
  const topic = `rls-room-${sfx}`
  await sql(`CREATE POLICY "read ${topic}" ON realtime.messages FOR SELECT TO authenticated
             USING ((SELECT realtime.topic()) = '${topic}' AND extension = 'broadcast')`)
  const supabase = newClient(mintToken({ role: 'authenticated', claims: { sub: 'gina' } }))
  const channel = supabase.channel(topic, { config: { private: true } })
  await subscribed(channel)
  const other = supabase.channel(`${topic}-other`, { config: { private: true } })
  const { statuses, subscribed: ok } = subscribe(other)
  ok.catch(() => {})
  const first = await statuses.find(() => true)
  assert.equal(first.status, 'CHANNEL_ERROR', 'the policy grants one topic only')
})

test('an accessToken callback authorizes channels as the user, over an anon apikey', async () => {
  // The usual app setup: the socket is opened with the project's anon key and the signed-in
  // user's token comes from the `accessToken` option; channels must act as the user.
  // supabase-js fetches that token asynchronously after createClient; a channel subscribed
  // in the same tick joins without `access_token`, i.e. as the apikey's role (anon), and the
  // client never pushes the token afterwards because it did not change. Supabase's server
  // treats that join the same way, so the test waits for the token like an app that renders
  // first: `realtime.setAuth()` without an argument asks the callback.
  let userToken = mintToken({ role: 'authenticated', claims: { sub: 'hana' } })
  const supabase = newClient(mintToken({ role: 'anon' }), { accessToken: async () => userToken })
  await supabase.realtime.setAuth()
  const channel = supabase.channel(`rls-callback-${sfx}`)
  const system = collectSystem(channel)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table: notes })
  const fenceEvents = listen(channel, { event: 'INSERT', schema: 'public', table: fence })
  await subscribed(channel)
  await sql(`INSERT INTO public."${notes}" VALUES (300, 'hana', 'h1'), (301, 'ivan', 'i1')`)
  await sql(`INSERT INTO public."${fence}" VALUES (300)`)
  await fenceEvents.find((e) => e.new.id === 300)
  assert.deepStrictEqual(rows(events), [{ id: 300, owner: 'hana', body: 'h1' }])

  // The callback now returns another user's token; setAuth() pushes it to the channel.
  userToken = mintToken({ role: 'authenticated', claims: { sub: 'ivan' } })
  await supabase.realtime.setAuth()
  for (let n = 310; !rows(events).some((r) => r.owner === 'ivan'); n += 1) {
    assert.ok(n < 350, 'ivan\'s rows never arrived after the refresh')
    await sql(`INSERT INTO public."${notes}" VALUES (${n}, 'ivan', 'probe')`)
    await sql(`INSERT INTO public."${fence}" VALUES (${n})`)
    await fenceEvents.find((e) => e.new.id === n)
  }
  await sql(`INSERT INTO public."${notes}" VALUES (400, 'hana', 'h2'), (401, 'ivan', 'i2')`)
  await sql(`INSERT INTO public."${fence}" VALUES (400)`)
  await fenceEvents.find((e) => e.new.id === 400)
  assert.deepStrictEqual(rows(events).at(-1), { id: 401, owner: 'ivan', body: 'i2' })
  assert.ok(!rows(events).some((r) => r.id === 400), 'hana\'s row after the switch')
  assert.deepStrictEqual(system.items.filter((m) => m.status === 'error'), [])
})
