// A walcast cluster for the end-to-end tests: a real redis-server of its own on a free port
// (no snapshots, no append-only file: it lives and dies with the test) and several
// `walcast serve --redis-url` nodes on the suite's database, all on one permanent slot of
// their own (a cluster needs a slot that outlives its streamer: the next one replays it).
//
//   startRedis()                      redis-server --port P --save '' --appendonly no
//   startCluster(redis, ['a','b','c']) nodes named a, b, c; resolves once every /readyz is 200
//   cluster.stop()                    SIGTERM every node, drop the slot, stop Redis

import { spawn } from 'node:child_process'
import net from 'node:net'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import { suffix, delay, sql } from './helpers.mjs'
import { freePort, startOwnServer } from './own-server.mjs'

/** Waits for a RESP `+PONG` from 127.0.0.1:port; false if nothing answers. */
function ping(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1')
    let got = ''
    const done = (ok) => {
      s.destroy()
      resolve(ok)
    }
    s.setTimeout(1000, () => done(false))
    s.on('error', () => done(false))
    s.on('connect', () => s.write('PING\r\n'))
    s.on('data', (d) => {
      got += d
      if (got.includes('\r\n')) done(got.startsWith('+PONG'))
    })
  })
}

/** A throwaway redis-server on a free port. */
export async function startRedis() {
  const port = await freePort()
  const child = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  )
  let log = ''
  child.stdout.on('data', (d) => (log += d))
  child.stderr.on('data', (d) => (log += d))
  let exited = null
  child.on('exit', (code) => (exited = code))
  child.on('error', (e) => (exited = String(e)))
  const deadline = Date.now() + 20_000
  while (!(await ping(port))) {
    if (exited !== null) {
      throw new Error(`redis-server exited (${exited}); scripts/setup installs it:\n${log}`)
    }
    if (Date.now() > deadline) throw new Error(`redis-server did not answer PING in 20 s:\n${log}`)
    await delay(50)
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (exited !== null) return
      const gone = new Promise((r) => child.once('exit', r))
      child.kill('SIGTERM')
      await Promise.race([gone, delay(5000)])
    },
  }
}

/** `/readyz` of a node: `{status, body}` (status 0 when it does not answer). */
export async function readyz(node) {
  try {
    const r = await fetch(`${node.http}/readyz`)
    return { status: r.status, body: await r.text() }
  } catch {
    return { status: 0, body: '' }
  }
}

/** Polls `/readyz` until `predicate({status, body})` holds. */
export async function untilReadyz(node, predicate, what, timeout = 60_000) {
  const deadline = Date.now() + timeout
  let last = null
  for (;;) {
    last = await readyz(node)
    if (predicate(last)) return last
    if (Date.now() > deadline) {
      throw new Error(`node ${node.id}: /readyz never showed ${what}; last ${last.status} ${JSON.stringify(last.body)}\n${node.log()}`)
    }
    await delay(100)
  }
}

/**
 * `ids.length` nodes on one Redis and one slot. Short timeouts so that a lost node is noticed
 * well within the tests' waits: the lease within 2 s, a silent node's presences within 3 s.
 */
export async function startCluster(redis, ids) {
  const slot = `e2e_cluster_${suffix()}`
  const nodes = []
  const cluster = {
    slot,
    nodes,
    async stop() {
      await Promise.all(nodes.map((n) => n.stop()))
      // Nodes hold the slot through a walsender that may linger a moment after they exit.
      for (let i = 0; i < 50; i++) {
        try {
          await sql(
            `SELECT pg_catalog.pg_drop_replication_slot(slot_name)
               FROM pg_catalog.pg_replication_slots WHERE slot_name = $1`,
            [slot],
          )
          break
        } catch {
          await delay(200)
        }
      }
    },
  }
  try {
    for (const id of ids) {
      const server = await startOwnServer(
        [
          '--redis-url', redis.url,
          '--node-id', id,
          '--failover-timeout-secs', '2',
          '--presence-node-timeout-secs', '3',
        ],
        { slot, probe: '/healthz' },
      )
      nodes.push({ ...server, id })
    }
    // Ready everywhere: one node streams the slot, the others follow the change stream,
    // and every node sees the whole cluster.
    for (const n of nodes) {
      await untilReadyz(
        n,
        (r) => r.status === 200 && r.body.includes(`nodes=${ids.length} redis=ok`),
        `200 with nodes=${ids.length} redis=ok`,
      )
    }
  } catch (e) {
    await cluster.stop()
    throw e
  }
  return cluster
}

/** The role (`streamer` | `follower`) a node's /readyz reports, or null. */
export async function roleOf(node) {
  const { body } = await readyz(node)
  const m = /^role: (\w+)$/m.exec(body)
  return m ? m[1] : null
}

/** supabase-js pointed at one node, the way an app behind a load balancer would be. */
export function clientOn(node, key, made) {
  const c = createClient(node.http, key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: WebSocket },
  })
  made.push(c)
  return c
}

export async function closeAll(clients) {
  await Promise.all(
    clients.splice(0).map(async (c) => {
      await Promise.race([c.removeAllChannels(), delay(2000)]).catch(() => {})
      c.realtime.disconnect()
    }),
  )
}
