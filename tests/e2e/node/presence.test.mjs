// Presence with supabase-js: sync / join / leave across three clients, updates, leaving on
// unsubscribe, a killed client (its socket vanishes without a close frame), a silent client
// (dropped by the server's idle timeout), and the per-client presence rate limit.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import {
  env, suffix, ensureRoles, closeSql, newClient, closeClients, mintToken, subscribed,
  EventLog, rawConnect,
} from './helpers.mjs'

const sfx = suffix()
const here = path.dirname(fileURLToPath(import.meta.url))

before(async () => {
  await ensureRoles()
})

after(async () => {
  await closeClients()
  await closeSql()
})

/** A channel with presence listeners; `state()` is the client's own view. */
async function presenceChannel(client, room, key) {
  const channel = client.channel(room, { config: { presence: { key } } })
  const joins = new EventLog(`joins seen by ${key}`)
  const leaves = new EventLog(`leaves seen by ${key}`)
  const syncs = new EventLog(`syncs seen by ${key}`)
  channel.on('presence', { event: 'join' }, (e) => joins.push(e))
  channel.on('presence', { event: 'leave' }, (e) => leaves.push(e))
  channel.on('presence', { event: 'sync' }, () => syncs.push(channel.presenceState()))
  await subscribed(channel)
  return { channel, joins, leaves, syncs, state: () => channel.presenceState() }
}

/** The state without the refs: {key: [payload, …]}. */
function plain(state) {
  const out = {}
  for (const [k, metas] of Object.entries(state)) {
    out[k] = metas.map(({ presence_ref, ...rest }) => rest)
  }
  return out
}

async function untilState(p, want, what) {
  await p.syncs.until(() => JSON.stringify(plain(p.state())) === JSON.stringify(want), {
    what: `${what}: ${JSON.stringify(want)} (now ${JSON.stringify(plain(p.state()))})`,
  })
}

test('three clients: sync, join, update, leave', async () => {
  const room = `p-three-${sfx}`
  const A = await presenceChannel(newClient(mintToken()), room, 'alice')
  const B = await presenceChannel(newClient(mintToken(), { realtime: { vsn: '1.0.0' } }), room, 'bob')
  const C = await presenceChannel(newClient(mintToken()), room, 'carol')
  assert.equal(await A.channel.track({ name: 'Alice' }), 'ok')
  assert.equal(await B.channel.track({ name: 'Bob' }), 'ok')
  assert.equal(await C.channel.track({ name: 'Carol' }), 'ok')
  const all = { alice: [{ name: 'Alice' }], bob: [{ name: 'Bob' }], carol: [{ name: 'Carol' }] }
  for (const p of [A, B, C]) {
    await untilState(p, all, 'everyone is present')
  }
  const bobJoin = await A.joins.find((e) => e.key === 'bob')
  assert.deepEqual(bobJoin.newPresences.map(({ presence_ref, ...r }) => r), [{ name: 'Bob' }])
  assert.match(bobJoin.newPresences[0].presence_ref, /.+/)

  // A late joiner gets the whole state with presence_state.
  const D = await presenceChannel(newClient(mintToken()), room, 'dave')
  await untilState(D, all, 'the late joiner sees everyone')

  // Update: one meta for alice, with the new payload; the old ref left.
  const oldRef = A.state().alice[0].presence_ref
  assert.equal(await A.channel.track({ name: 'Alice', status: 'away' }), 'ok')
  const updated = { ...all, alice: [{ name: 'Alice', status: 'away' }] }
  for (const p of [B, C, D]) {
    await untilState(p, updated, 'alice updated')
  }
  const left = await B.leaves.find((e) => e.key === 'alice')
  assert.deepEqual(left.leftPresences.map((m) => m.presence_ref), [oldRef])
  assert.notEqual(B.state().alice[0].presence_ref, oldRef)

  // Untrack, then unsubscribe: both leave.
  assert.equal(await C.channel.untrack(), 'ok')
  const { carol, ...withoutCarol } = updated
  await untilState(A, withoutCarol, 'carol untracked')
  await B.channel.unsubscribe()
  const { bob, ...onlyAlice } = withoutCarol
  await untilState(A, onlyAlice, 'bob left with his channel')
  await untilState(D, onlyAlice, 'bob left with his channel')
})

test('a killed client leaves', async () => {
  const room = `p-killed-${sfx}`
  const A = await presenceChannel(newClient(mintToken()), room, 'watcher')
  // A separate process with its own supabase-js client; SIGKILL closes its TCP connection
  // without a WebSocket close frame.
  const script = `
    import { createClient } from '@supabase/supabase-js'
    import WebSocket from 'ws'
    const c = createClient(process.env.WALCAST_HTTP, process.env.TOKEN, {
      auth: { persistSession: false }, realtime: { transport: WebSocket } })
    const ch = c.channel(process.env.ROOM, { config: { presence: { key: 'ghost' } } })
    ch.on('presence', { event: 'sync' }, () => {})
    ch.subscribe(async (s) => { if (s === 'SUBSCRIBED') { await ch.track({ boo: 1 }); console.log('tracked') } })
  `
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
    cwd: here,
    env: { ...process.env, WALCAST_HTTP: env.http, TOKEN: mintToken(), ROOM: room },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  try {
    await untilState(A, { ghost: [{ boo: 1 }] }, 'the ghost is present')
  } finally {
    child.kill('SIGKILL')
  }
  const gone = await A.leaves.find((e) => e.key === 'ghost')
  assert.deepEqual(gone.leftPresences.map(({ presence_ref, ...r }) => r), [{ boo: 1 }])
  await untilState(A, {}, 'the ghost left')
})

test('a silent client is dropped by the idle timeout and leaves', async () => {
  const room = `p-silent-${sfx}`
  const A = await presenceChannel(newClient(mintToken()), room, 'watcher')
  // Raw socket: joins, tracks, then sends nothing, not even heartbeats. Its TCP connection
  // stays open, so only the server's idle timeout can notice it is gone.
  const raw = await rawConnect({ token: mintToken(), vsn: '2.0.0' })
  const topic = `realtime:${room}`
  raw.send(['1', '1', topic, 'phx_join', { config: { presence: { key: 'silent', enabled: true } } }])
  await raw.next((f) => f[3] === 'phx_reply' && f[1] === '1', 'join reply')
  raw.send(['1', '2', topic, 'presence', { type: 'presence', event: 'track', payload: { quiet: true } }])
  await untilState(A, { silent: [{ quiet: true }] }, 'the silent client is present')
  const timeout = 120_000
  await A.leaves.find((e) => e.key === 'silent', { timeout })
  const closed = await raw.closed
  assert.equal(closed.reason, 'idle timeout')
  await untilState(A, {}, 'the silent client left')
})

test('presence_state follows the join reply, and the rate limit closes the channel', async () => {
  const raw = await rawConnect({ token: mintToken(), vsn: '2.0.0' })
  const topic = `realtime:p-rate-${sfx}`
  raw.send(['5', '5', topic, 'phx_join', { config: { presence: { key: 'k', enabled: true } } }])
  await raw.next((f) => f[3] === 'presence_state', 'presence_state')
  const idx = (ev) => raw.frames.items.findIndex((f) => f[3] === ev)
  assert.ok(idx('phx_reply') < idx('presence_state'), 'reply first, then presence_state')
  assert.deepEqual(raw.frames.items[idx('presence_state')], ['5', null, topic, 'presence_state', {}])
  for (let i = 0; i < 6; i++) {
    raw.send(['5', `t${i}`, topic, 'presence', { event: 'track', payload: { i } }])
  }
  const sys = await raw.next((f) => f[3] === 'system', 'system error')
  assert.deepEqual(sys, ['5', null, topic, 'system', {
    extension: 'system', status: 'error', message: 'Client presence rate limit exceeded', channel: `p-rate-${sfx}`,
  }])
  await raw.next((f) => f[3] === 'phx_close', 'phx_close')
  const replies = raw.frames.items.filter((f) => f[3] === 'phx_reply' && String(f[1]).startsWith('t'))
  assert.equal(replies.length, 5)
  const diffs = raw.frames.items.filter((f) => f[3] === 'presence_diff')
  assert.equal(diffs.length, 5, 'the first five tracks produced diffs (each one an update)')
  assert.deepEqual(Object.keys(diffs[4][4].leaves), ['k'])
  raw.close()
})
