// Cluster mode with supabase-js (issue #13): three `walcast serve --redis-url` nodes on one
// redis-server of this file's own, one database and one slot (cluster.mjs). Clients connected
// to different nodes exchange broadcasts both ways with `self: false` kept, an HTTP broadcast
// on one node reaches clients on the others, presence is the union over nodes (sync, join,
// leave on untrack and on disconnect), an INSERT reaches subscribers on every node once, and
// a follower killed with SIGKILL makes its presences leave on the others.
//
// Cross-node waits are "until it arrives" with a generous deadline (the nodes share the
// machine with the rest of the suite). Before the first broadcast, every client has seen the
// others' presence: that presence came over Redis on the topic's channel, so each node is
// subscribed to the topic and a broadcast cannot miss it. "Did not arrive" is proved with a
// fence: a reply that was sent only after the message in question had been received.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, ensureRoles, createTable, sql, closeSql, mintToken, subscribed, listen, EventLog,
  shape,
} from './helpers.mjs'
import { startRedis, startCluster, clientOn, closeAll, roleOf, untilReadyz } from './cluster.mjs'

const WAIT = 30_000
const sfx = suffix()
const made = []
let redis = null
let cluster = null
let A, B, C

before(async () => {
  await ensureRoles()
  redis = await startRedis()
  cluster = await startCluster(redis, [`a-${sfx}`, `b-${sfx}`, `c-${sfx}`])
  ;[A, B, C] = cluster.nodes
}, { timeout: 240_000 })

after(async () => {
  await closeAll(made)
  if (cluster) await cluster.stop()
  if (redis) await redis.stop()
  await closeSql()
})

/** A room member on `node`: broadcast and presence listeners, its own view of the state. */
async function member(node, room, key, { self = false } = {}) {
  const client = clientOn(node, mintToken(), made)
  const channel = client.channel(room, { config: { broadcast: { self }, presence: { key } } })
  const broadcasts = new EventLog(`broadcasts seen by ${key} on ${node.id}`)
  const joins = new EventLog(`joins seen by ${key}`)
  const leaves = new EventLog(`leaves seen by ${key}`)
  const syncs = new EventLog(`syncs seen by ${key}`)
  channel.on('broadcast', { event: '*' }, (m) => broadcasts.push(m))
  channel.on('presence', { event: 'join' }, (e) => joins.push(e))
  channel.on('presence', { event: 'leave' }, (e) => leaves.push(e))
  channel.on('presence', { event: 'sync' }, () => syncs.push(channel.presenceState()))
  await subscribed(channel, { timeout: WAIT })
  return { key, client, channel, broadcasts, joins, leaves, syncs, state: () => channel.presenceState() }
}

/** The state without refs: {key: [payload, …]}, keys sorted. */
function plain(state) {
  const out = {}
  for (const k of Object.keys(state).sort()) {
    out[k] = state[k].map(({ presence_ref, ...rest }) => rest)
  }
  return out
}

async function untilState(m, want, what) {
  const wanted = JSON.stringify(plain(want))
  await m.syncs.until(() => JSON.stringify(plain(m.state())) === wanted, {
    timeout: WAIT,
    what: `${what} for ${m.key}: ${wanted} (now ${JSON.stringify(plain(m.state()))})`,
  })
}

test('broadcast and presence between clients on different nodes', { timeout: 180_000 }, async () => {
  const room = `cl-room-${sfx}`
  const alice = await member(A, room, 'alice')
  const bob = await member(B, room, 'bob')
  const carol = await member(C, room, 'carol')
  assert.equal(await alice.channel.track({ on: 'a' }), 'ok')
  assert.equal(await bob.channel.track({ on: 'b' }), 'ok')
  assert.equal(await carol.channel.track({ on: 'c' }), 'ok')
  const all = { alice: [{ on: 'a' }], bob: [{ on: 'b' }], carol: [{ on: 'c' }] }
  for (const m of [alice, bob, carol]) await untilState(m, all, 'everyone, whichever node')
  // The join events carry the other node's payload.
  const aliceOnB = await bob.joins.find((e) => e.key === 'alice', { timeout: WAIT })
  assert.deepEqual(aliceOnB.newPresences.map(({ presence_ref, ...r }) => r), [{ on: 'a' }])
  assert.match(aliceOnB.newPresences[0].presence_ref, /.+/)

  // Client → client, A → B and C, with self: false on the sender.
  assert.equal(await alice.channel.send({ type: 'broadcast', event: 'ping', payload: { from: 'a' } }), 'ok')
  for (const m of [bob, carol]) {
    const got = await m.broadcasts.find((x) => x.event === 'ping', { timeout: WAIT })
    assert.deepEqual(got, { type: 'broadcast', event: 'ping', payload: { from: 'a' } })
  }
  // And back, B → A and C: sent only after B had the ping.
  assert.equal(await bob.channel.send({ type: 'broadcast', event: 'pong', payload: { from: 'b' } }), 'ok')
  for (const m of [alice, carol]) {
    const got = await m.broadcasts.find((x) => x.event === 'pong', { timeout: WAIT })
    assert.deepEqual(got, { type: 'broadcast', event: 'pong', payload: { from: 'b' } })
  }
  // The pong is the fence: Alice never got her own ping back through Redis, Bob his pong
  // never came back either (he gets Carol's reply below, sent after she had it).
  assert.deepEqual(alice.broadcasts.items.map((x) => x.event), ['pong'])
  assert.equal(await carol.channel.send({ type: 'broadcast', event: 'done', payload: {} }), 'ok')
  await bob.broadcasts.find((x) => x.event === 'done', { timeout: WAIT })
  assert.deepEqual(bob.broadcasts.items.map((x) => x.event), ['ping', 'done'])
  assert.deepEqual(carol.broadcasts.items.map((x) => x.event), ['ping', 'pong'], 'each once')

  // With self: true on node A, the sender gets its own message once (locally, not again
  // through Redis), and B gets it too.
  const dave = await member(A, room, 'dave', { self: true })
  await untilState(dave, all, 'the late joiner on A sees everyone')
  assert.equal(await dave.channel.send({ type: 'broadcast', event: 'echo', payload: { n: 1 } }), 'ok')
  await dave.broadcasts.find((x) => x.event === 'echo', { timeout: WAIT })
  await bob.broadcasts.find((x) => x.event === 'echo', { timeout: WAIT })

  // HTTP POST /api/broadcast on node A reaches the clients on B and C (and A's own).
  const res = await fetch(`${A.http}/api/broadcast`, {
    method: 'POST',
    headers: { apikey: mintToken(), 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ topic: room, event: 'rest', payload: { via: 'http' } }] }),
  })
  assert.equal(res.status, 202, await res.text())
  for (const m of [bob, carol, alice]) {
    const got = await m.broadcasts.find((x) => x.event === 'rest', { timeout: WAIT })
    assert.deepEqual(got, { type: 'broadcast', event: 'rest', payload: { via: 'http' } })
  }
  // Dave's echo reached him once: his later HTTP broadcast is the fence.
  await dave.broadcasts.find((x) => x.event === 'rest', { timeout: WAIT })
  assert.deepEqual(dave.broadcasts.items.map((x) => x.event), ['echo', 'rest'])

  // Presence leaves across nodes: untrack on A, then a new track, then a disconnect.
  assert.equal(await alice.channel.untrack(), 'ok')
  const { alice: _gone, ...withoutAlice } = all
  for (const m of [bob, carol]) await untilState(m, withoutAlice, 'alice untracked on A')
  const left = await bob.leaves.find((e) => e.key === 'alice', { timeout: WAIT })
  assert.deepEqual(left.leftPresences.map(({ presence_ref, ...r }) => r), [{ on: 'a' }])

  assert.equal(await alice.channel.track({ on: 'a', again: true }), 'ok')
  const back = { ...all, alice: [{ on: 'a', again: true }] }
  for (const m of [bob, carol]) await untilState(m, back, 'alice tracked again on A')

  alice.client.realtime.disconnect()
  for (const m of [bob, carol]) await untilState(m, withoutAlice, "alice's socket on A closed")
  const leavesOfAlice = bob.leaves.items.filter((e) => e.key === 'alice')
  assert.equal(leavesOfAlice.length, 2, 'one leave per untrack / disconnect')
  assert.deepEqual(leavesOfAlice[1].leftPresences.map(({ presence_ref, ...r }) => r), [{ on: 'a', again: true }])
})

test('an INSERT reaches subscribers on every node, once', { timeout: 120_000 }, async () => {
  const table = `cl_changes_${sfx}`
  await createTable(table, 'id int4 PRIMARY KEY, title text')
  const logs = []
  for (const node of [A, B, C]) {
    const channel = clientOn(node, mintToken(), made).channel(`cl-changes-${node.id}`)
    logs.push(listen(channel, { event: 'INSERT', schema: 'public', table }, `inserts on ${node.id}`))
    await subscribed(channel, { timeout: WAIT })
  }
  await sql(`INSERT INTO public."${table}" (id, title) VALUES (1, 'everywhere')`)
  // A second transaction is the fence: once it is here, a duplicate of the first would be too.
  await sql(`INSERT INTO public."${table}" (id, title) VALUES (2, 'fence')`)
  for (const log of logs) {
    const got = await log.count(2, { timeout: WAIT })
    assert.deepStrictEqual(shape(got[0], assert), {
      schema: 'public', table, eventType: 'INSERT', new: { id: 1, title: 'everywhere' }, old: {}, errors: null,
    })
    assert.deepEqual(got.map((p) => p.new.id), [1, 2], log.label)
    assert.equal(log.length, 2, `${log.label}: exactly once`)
  }
  // Exactly one node streams the slot; the others follow the cluster's change stream.
  const roles = (await Promise.all([A, B, C].map(roleOf))).sort()
  assert.deepEqual(roles, ['follower', 'follower', 'streamer'])
})

test('a follower killed with SIGKILL: its presences leave on the other nodes', { timeout: 120_000 }, async () => {
  const room = `cl-kill-${sfx}`
  const nodes = [A, B, C]
  const roles = await Promise.all(nodes.map(roleOf))
  const victim = nodes[roles.indexOf('follower')]
  const [w1, w2] = nodes.filter((n) => n !== victim)
  const erin = await member(victim, room, 'erin')
  const watch1 = await member(w1, room, 'w1')
  const watch2 = await member(w2, room, 'w2')
  assert.equal(await erin.channel.track({ doomed: true }), 'ok')
  assert.equal(await watch1.channel.track({ w: 1 }), 'ok')
  assert.equal(await watch2.channel.track({ w: 2 }), 'ok')
  const everyone = { erin: [{ doomed: true }], w1: [{ w: 1 }], w2: [{ w: 2 }] }
  for (const m of [watch1, watch2]) await untilState(m, everyone, 'erin is present')

  await victim.kill()
  const survivors = { w1: [{ w: 1 }], w2: [{ w: 2 }] }
  for (const m of [watch1, watch2]) await untilState(m, survivors, `erin's node ${victim.id} was killed`)
  const gone = await watch1.leaves.find((e) => e.key === 'erin', { timeout: WAIT })
  assert.deepEqual(gone.leftPresences.map(({ presence_ref, ...r }) => r), [{ doomed: true }])
  for (const n of [w1, w2]) {
    await untilReadyz(n, (r) => r.status === 200 && r.body.includes('nodes=2 redis=ok'), 'nodes=2', WAIT)
  }
})
