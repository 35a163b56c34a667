// A second `walcast serve` with its own flags, for tests of server-wide options. It streams
// the suite's database through a temporary slot (nothing left behind) on a free port, and is
// stopped with SIGTERM by the test that started it.

import { spawn } from 'node:child_process'
import net from 'node:net'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { env, suffix, delay } from './helpers.mjs'

const here = path.dirname(fileURLToPath(import.meta.url))

function binary() {
  return process.env.WALCAST_BIN ?? path.resolve(here, '../../../target/debug/walcast')
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

/**
 * Start walcast with `args` on top of the suite's database and secret; wait for /readyz.
 * With `slot`, stream from that existing slot (not a temporary one of its own); with
 * `probe: '/healthz'`, return once it serves HTTP, streaming or not (e.g. on a slot another
 * server holds).
 */
export async function startOwnServer(args = [], { slot: existing, probe = '/readyz' } = {}) {
  const port = await freePort()
  const slot = existing ?? `e2e_own_${suffix()}`
  const child = spawn(
    binary(),
    [
      'serve',
      '--database-url', env.databaseUrl,
      '--jwt-secret', env.jwtSecret,
      '--port', String(port),
      '--bind', '127.0.0.1',
      '--publication', 'walcast',
      '--slot', slot,
      ...(existing ? [] : ['--temporary-slot']),
      '--channel-error-backoff-ms', '0',
      ...args,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'info' } },
  )
  let log = ''
  child.stdout.on('data', (d) => (log += d))
  child.stderr.on('data', (d) => (log += d))
  let exited = null
  child.on('exit', (code) => (exited = code))
  const http = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 30_000
  for (;;) {
    if (exited !== null) throw new Error(`walcast ${args.join(' ')} exited with ${exited}:\n${log}`)
    try {
      const r = await fetch(`${http}${probe}`)
      if (r.status === 200) break
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`walcast ${args.join(' ')} not ready in 30 s:\n${log}`)
    await delay(100)
  }
  return {
    http,
    slot,
    pid: child.pid,
    log: () => log,
    /** SIGKILL (no clean shutdown: no lease release, no leaves); resolves once it is gone. */
    async kill() {
      if (exited !== null) return
      const gone = new Promise((r) => child.once('exit', r))
      child.kill('SIGKILL')
      await gone
    },
    async stop() {
      if (exited !== null) return
      const gone = new Promise((r) => child.once('exit', r))
      child.kill('SIGTERM')
      await Promise.race([gone, delay(10_000)])
    },
  }
}
