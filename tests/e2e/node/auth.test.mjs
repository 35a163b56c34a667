// Tokens: refreshing a channel token with setAuth keeps the channel alive past the old
// token's expiry; an expiring token without refresh closes the channel (system error +
// phx_close); forged and expired tokens are refused at the WebSocket upgrade.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import crypto from 'node:crypto'
import {
  suffix, sql, closeSql, ensureRoles, createTable, newClient, closeClients, mintToken,
  subscribe, subscribed, listen, shape, collectSystem, rawConnect, delay, EventLog, env,
} from './helpers.mjs'

const sfx = suffix()
const table = `auth_${sfx}`

before(async () => {
  await ensureRoles()
  await createTable(table, 'id int4 PRIMARY KEY, v text')
})

after(async () => {
  await closeClients()
  await closeSql()
})

/** Waits until the wall clock is past `expSeconds` plus a margin for the server's check. */
async function pastExpiry(expSeconds, marginMs = 2000) {
  const wait = expSeconds * 1000 + marginMs - Date.now()
  if (wait > 0) await delay(wait)
}

test('setAuth with a fresh token keeps a subscribed channel receiving past the old expiry', async () => {
  // The app's pattern for custom JWTs: the anon key for the socket, the user's session
  // token for channels, supplied through `accessToken` and pushed with setAuth on refresh.
  const shortToken = mintToken({ role: 'authenticated', expiresIn: 5, claims: { sub: 'u1' } })
  const shortExp = JSON.parse(Buffer.from(shortToken.split('.')[1], 'base64url')).exp
  const box = { token: shortToken }
  const supabase = newClient(mintToken(), { accessToken: async () => box.token })
  const channel = supabase.channel(`auth-refresh-${sfx}`)
  const system = collectSystem(channel)
  const events = listen(channel, { event: 'INSERT', schema: 'public', table })
  const statuses = await subscribed(channel)

  await sql(`INSERT INTO public."${table}" (id, v) VALUES (1, 'before refresh')`)
  await events.count(1)

  box.token = mintToken({ role: 'authenticated', expiresIn: 3600, claims: { sub: 'u1' } })
  await supabase.realtime.setAuth(box.token)

  await pastExpiry(shortExp)
  await sql(`INSERT INTO public."${table}" (id, v) VALUES (2, 'after the old token expired')`)
  await events.count(2)

  assert.deepStrictEqual(events.items.map((e) => shape(e, assert)), [
    { schema: 'public', table, errors: null, eventType: 'INSERT', new: { id: 1, v: 'before refresh' }, old: {} },
    { schema: 'public', table, errors: null, eventType: 'INSERT', new: { id: 2, v: 'after the old token expired' }, old: {} },
  ])
  assert.deepStrictEqual(statuses.items.map((s) => s.status), ['SUBSCRIBED'], 'no CLOSED / CHANNEL_ERROR')
  assert.deepStrictEqual(system.items.filter((m) => m.status === 'error'), [], 'no system error')
})

test('a channel token that expires without refresh closes the channel', async () => {
  const token = mintToken({ role: 'anon', expiresIn: 4 })
  const supabase = newClient(token)
  const name = `auth-expiry-${sfx}`
  const channel = supabase.channel(name)
  const system = collectSystem(channel)
  listen(channel, { event: 'INSERT', schema: 'public', table })
  const { statuses, subscribed: ok } = subscribe(channel)
  await ok

  const closed = await statuses.find((s) => s.status === 'CLOSED', { timeout: 20_000, what: 'CLOSED' })
  assert.ok(closed)
  const err = system.items.find((m) => m.status === 'error')
  assert.ok(err, `a system error before the close; system messages: ${JSON.stringify(system.items)}`)
  assert.equal(err.extension, 'system')
  assert.equal(err.channel, name)
  assert.match(err.message, /^Token has expired \d+ seconds ago$/)
  // The system error comes before phx_close, and the client does not rejoin on its own.
  assert.deepStrictEqual(statuses.items.map((s) => s.status), ['SUBSCRIBED', 'CLOSED'])
  assert.equal(channel.state, 'closed')
})

for (const [label, makeToken, body] of [
  ['forged (wrong secret)', () => mintToken({ secret: `not-the-secret-${sfx}` }), { error: 'Failed to validate JWT signature' }],
  ['expired', () => mintToken({ expiresIn: -60 }), { error: 'Token has expired' }],
]) {
  test(`${label} token: the upgrade is refused with 401 and a JSON reason`, async () => {
    // The same URL with a valid token is accepted, so the refusal below is about the token.
    ;(await rawConnect({ token: mintToken() })).close()
    for (const path of ['/realtime/v1/websocket', '/socket/websocket']) {
      const err = await rawConnect({ token: makeToken(), path }).then(
        (sock) => {
          sock.close()
          return null
        },
        (e) => e,
      )
      assert.ok(err && err.status, `the upgrade on ${path} must be refused, got ${err}`)
      assert.equal(err.status, 401, path)
      assert.deepStrictEqual(JSON.parse(err.body), body, path)
    }
  })

  test(`${label} token: supabase-js never reaches SUBSCRIBED`, async () => {
    ;(await rawConnect({ token: mintToken() })).close() // the server is up and accepts valid tokens
    const supabase = newClient(makeToken())
    const channel = supabase.channel(`auth-refused-${label.split(' ')[0]}-${sfx}`)
    listen(channel, { event: '*', schema: 'public', table })
    const statuses = new EventLog('statuses')
    channel.subscribe((status, e) => statuses.push({ status, error: e ? String(e.message ?? e) : null }))
    const first = await statuses.count(1, { timeout: 15_000 })
    assert.ok(['CHANNEL_ERROR', 'TIMED_OUT'].includes(first[0].status), `got ${JSON.stringify(first)}`)
    assert.ok(!statuses.items.some((s) => s.status === 'SUBSCRIBED'))
    assert.equal(supabase.realtime.isConnected(), false)
    supabase.realtime.disconnect()
  })
}

test('a token without role or exp is refused at the upgrade', async () => {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const input = `${enc({ alg: 'HS256', typ: 'JWT' })}.${enc({ sub: 'x', iat: Math.floor(Date.now() / 1000) })}`
  const sig = crypto.createHmac('sha256', env.jwtSecret).update(input).digest('base64url')
  const err = await rawConnect({ token: `${input}.${sig}` }).then((s) => (s.close(), null), (e) => e)
  assert.ok(err && err.status, 'the upgrade must be refused')
  assert.equal(err.status, 401)
  assert.deepStrictEqual(JSON.parse(err.body), { error: 'Fields `role` and `exp` are required in JWT' })

  const missing = await rawConnect({}).then((s) => (s.close(), null), (e) => e)
  assert.ok(missing && missing.status, 'no apikey: the upgrade must be refused')
  assert.equal(missing.status, 401)
  assert.deepStrictEqual(JSON.parse(missing.body), { error: 'API key is missing' })
})
