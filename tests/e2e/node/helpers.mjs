// Shared helpers for the supabase-js end-to-end tests.
//
// Everything here talks to the real thing: a running `walcast serve` (WALCAST_HTTP), its
// Postgres (DATABASE_URL) and the JWT secret the server verifies with (JWT_SECRET). The
// run script exports those three; see ../README.md to point a single file at a server.
//
// Waiting is always "until an event arrives or a deadline passes": no test asserts on the
// passage of time. To prove that something did NOT arrive, tests use a fence: a later
// change on another binding of the same channel. Changes are delivered in commit order
// on a channel, so once the fence has arrived, anything that was going to arrive before it
// has arrived.

import crypto from 'node:crypto'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import pg from 'pg'

export const WAIT_MS = 10_000

function requireEnv(name) {
  const value = process.env[name]
  if (!value) {
    throw new Error(
      `${name} is not set: run the suite through tests/e2e/run, or export WALCAST_HTTP, ` +
        `DATABASE_URL and JWT_SECRET for a running server (see tests/e2e/README.md)`,
    )
  }
  return value
}

export const env = {
  get http() {
    return requireEnv('WALCAST_HTTP').replace(/\/+$/, '')
  },
  get databaseUrl() {
    return requireEnv('DATABASE_URL')
  },
  get jwtSecret() {
    return requireEnv('JWT_SECRET')
  },
  get ws() {
    return this.http.replace(/^http/, 'ws')
  },
}

/** A short random suffix so every test file uses its own tables and channels. */
export function suffix() {
  return crypto.randomBytes(5).toString('hex')
}

// ---------------------------------------------------------------------------------------
// JWT (HS256) minted with node:crypto

function b64url(input) {
  return Buffer.from(input).toString('base64url')
}

/**
 * An HS256 token. `expiresIn` is in seconds from now (negative: already expired);
 * `claims` are merged over `{role, exp, iat}`.
 */
export function mintToken({
  role = 'anon',
  expiresIn = 3600,
  secret = env.jwtSecret,
  claims = {},
} = {}) {
  const now = Math.floor(Date.now() / 1000)
  const header = { alg: 'HS256', typ: 'JWT' }
  const body = { role, iat: now, exp: now + expiresIn, ...claims }
  const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(body))}`
  const signature = crypto.createHmac('sha256', secret).update(signingInput).digest('base64url')
  return `${signingInput}.${signature}`
}

// ---------------------------------------------------------------------------------------
// SQL

let pool = null

/** Runs one statement (or a multi-statement string without parameters). */
export async function sql(text, params) {
  if (!pool) {
    pool = new pg.Pool({ connectionString: env.databaseUrl, max: 4 })
  }
  return pool.query(text, params)
}

export async function closeSql() {
  if (pool) {
    const p = pool
    pool = null
    await p.end()
  }
}

/** Quotes an identifier (tests build their own names, but quote anyway). */
export function ident(name) {
  return `"${String(name).replace(/"/g, '""')}"`
}

/** Roles the tokens use. Idempotent and safe when several files run it at once. */
export async function ensureRoles(...extra) {
  for (const role of ['anon', 'authenticated', ...extra]) {
    await sql(`DO $$ BEGIN
      CREATE ROLE ${ident(role)} NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$`)
  }
}

/**
 * Creates `public.<name>` with the given column list, grants SELECT to anon and
 * authenticated (unless `grant: false`) and sets the replica identity.
 */
export async function createTable(name, columns, { grant = true, replicaIdentity = 'DEFAULT' } = {}) {
  const t = `public.${ident(name)}`
  await sql(`CREATE TABLE ${t} (${columns})`)
  await sql(`ALTER TABLE ${t} REPLICA IDENTITY ${replicaIdentity}`)
  if (grant) {
    await sql(`GRANT SELECT ON ${t} TO anon, authenticated`)
  }
  return t
}

// ---------------------------------------------------------------------------------------
// Waiting

/** An append-only list of things that happened, with "wait until" on top. */
export class EventLog {
  constructor(label = 'events') {
    this.label = label
    this.items = []
    this.waiters = new Set()
  }

  push(item) {
    this.items.push(item)
    for (const w of [...this.waiters]) w.check()
  }

  get length() {
    return this.items.length
  }

  /** Resolves with `items` once `predicate(items)` holds; rejects after `timeout` ms. */
  until(predicate, { timeout = WAIT_MS, what = 'the condition' } = {}) {
    return new Promise((resolve, reject) => {
      const waiter = {
        check: () => {
          let ok = false
          try {
            ok = predicate(this.items)
          } catch (e) {
            clearTimeout(waiter.timer)
            this.waiters.delete(waiter)
            reject(e)
            return
          }
          if (ok) {
            clearTimeout(waiter.timer)
            this.waiters.delete(waiter)
            resolve(this.items)
          }
        },
      }
      waiter.timer = setTimeout(() => {
        this.waiters.delete(waiter)
        reject(
          new Error(
            `timed out after ${timeout} ms waiting for ${what} on ${this.label}; ` +
              `got ${this.items.length}: ${preview(this.items)}`,
          ),
        )
      }, timeout)
      this.waiters.add(waiter)
      waiter.check()
    })
  }

  /** Resolves with the first `n` items once there are at least `n`. */
  async count(n, opts = {}) {
    await this.until((items) => items.length >= n, { what: `${n} item(s)`, ...opts })
    return this.items.slice(0, n)
  }

  /** Resolves with the first item matching `predicate`. */
  async find(predicate, opts = {}) {
    await this.until((items) => items.some(predicate), { what: 'a matching item', ...opts })
    return this.items.find(predicate)
  }
}

function preview(items) {
  const s = JSON.stringify(items)
  return s === undefined ? String(items) : s.length > 1500 ? `${s.slice(0, 1500)}…` : s
}

// ---------------------------------------------------------------------------------------
// supabase-js

const clients = new Set()

/**
 * `createClient(WALCAST_HTTP, key, …)` the way an app does it. Node 20 has no global
 * WebSocket, so the `ws` package is passed as the transport (also fine on Node 22+).
 * `options.realtime` is merged into the realtime options (vsn, heartbeatIntervalMs, …).
 */
export function newClient(key, options = {}) {
  const { realtime = {}, ...rest } = options
  const client = createClient(env.http, key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    ...rest,
    realtime: { transport: WebSocket, ...realtime },
  })
  clients.add(client)
  return client
}

/** Removes every channel and closes the socket of every client made by `newClient`. */
export async function closeClients() {
  const all = [...clients]
  clients.clear()
  await Promise.all(
    all.map(async (c) => {
      try {
        await Promise.race([c.removeAllChannels(), delay(3000)])
      } catch {
        // the socket may already be gone; disconnecting below is what matters
      }
      c.realtime.disconnect()
    }),
  )
}

export function delay(ms) {
  return new Promise((r) => setTimeout(r, ms))
}

/**
 * Subscribes `channel` and records every status the client reports (with its error).
 * Returns `{ statuses, subscribed }` where `subscribed` resolves on SUBSCRIBED and rejects
 * on the first CHANNEL_ERROR / TIMED_OUT / CLOSED or after `timeout`.
 */
export function subscribe(channel, { timeout = WAIT_MS } = {}) {
  const statuses = new EventLog(`status of ${channel.topic}`)
  channel.subscribe((status, err) => {
    statuses.push({ status, error: err ? String(err.message ?? err) : null })
  })
  const subscribed = statuses
    .until((items) => items.length > 0, { timeout, what: 'a subscribe status' })
    .then((items) => {
      const first = items[0]
      if (first.status !== 'SUBSCRIBED') {
        throw new Error(`channel ${channel.topic} reported ${first.status}: ${first.error}`)
      }
      return first
    })
  return { statuses, subscribed }
}

/** Subscribes and waits for SUBSCRIBED; returns the status log. */
export async function subscribed(channel, opts) {
  const s = subscribe(channel, opts)
  await s.subscribed
  return s.statuses
}

/** Collects every `system` message of a channel (register before subscribing). */
export function collectSystem(channel) {
  const log = new EventLog(`system messages of ${channel.topic}`)
  channel.on('system', {}, (payload) => log.push(payload))
  return log
}

/** Registers a postgres_changes binding and returns the log of payloads it receives. */
export function listen(channel, filter, label) {
  const log = new EventLog(label ?? `${channel.topic} ${JSON.stringify(filter)}`)
  channel.on('postgres_changes', filter, (payload) => log.push(payload))
  return log
}

// ---------------------------------------------------------------------------------------
// Payload checks

export const COMMIT_TS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/

/**
 * The supabase-js view of a change with the commit timestamp checked and removed, so the
 * rest can be compared with deepStrictEqual.
 */
export function shape(payload, assert) {
  assert.match(payload.commit_timestamp, COMMIT_TS, `commit_timestamp ${payload.commit_timestamp}`)
  const { commit_timestamp, ...rest } = payload
  return rest
}

// ---------------------------------------------------------------------------------------
// Raw WebSocket (npm `ws`) for frame-level assertions

/** The socket URL for a raw connection. */
export function socketUrl({ token, vsn = '2.0.0', path = '/realtime/v1/websocket' } = {}) {
  const q = new URLSearchParams()
  if (token !== undefined) q.set('apikey', token)
  if (vsn !== null) q.set('vsn', vsn)
  return `${env.ws}${path}?${q}`
}

/**
 * Opens a raw WebSocket. Resolves with a `RawSocket` on open; rejects with
 * `{status, body}` attached when the server refuses the upgrade.
 */
export function rawConnect(opts = {}) {
  const url = socketUrl(opts)
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url)
    const frames = new EventLog(`frames of ${url.replace(/apikey=[^&]*/, 'apikey=…')}`)
    ws.on('message', (data, isBinary) => {
      frames.push(isBinary ? { binary: Buffer.from(data) } : JSON.parse(data.toString()))
    })
    const timer = setTimeout(() => {
      ws.terminate()
      reject(new Error(`no WebSocket open or refusal within ${WAIT_MS} ms (${url})`))
    }, WAIT_MS)
    ws.once('open', () => {
      clearTimeout(timer)
      resolve(new RawSocket(ws, frames))
    })
    ws.once('unexpected-response', (_req, res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c) => (body += c))
      res.on('end', () => {
        clearTimeout(timer)
        const err = new Error(`upgrade refused with HTTP ${res.statusCode}: ${body}`)
        err.status = res.statusCode
        err.body = body
        err.contentType = res.headers['content-type']
        ws.terminate()
        reject(err)
      })
    })
    // `on`, not `once`: terminating a refused handshake emits a second error.
    ws.on('error', (e) => {
      clearTimeout(timer)
      reject(e)
    })
  })
}

export class RawSocket {
  constructor(ws, frames) {
    this.ws = ws
    this.frames = frames
    this.closed = new Promise((r) => ws.once('close', (code, reason) => r({ code, reason: reason.toString() })))
  }

  send(frame) {
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame))
  }

  /** First frame matching `predicate` (vsn 2 frames are arrays: [join_ref, ref, topic, event, payload]). */
  next(predicate, what = 'a matching frame', timeout = WAIT_MS) {
    return this.frames.find(predicate, { what, timeout })
  }

  close() {
    this.ws.close()
  }
}

/** The `[join_ref, ref, topic, "phx_join", payload]` frame for postgres_changes bindings. */
export function joinFrame(joinRef, topic, bindings, token) {
  const payload = {
    config: {
      broadcast: { ack: false, self: false },
      presence: { key: '', enabled: false },
      postgres_changes: bindings,
      private: false,
    },
  }
  if (token) payload.access_token = token
  return [joinRef, joinRef, topic, 'phx_join', payload]
}

/**
 * A transport for supabase-js that records the URL it was opened with and every text frame
 * it receives, so tests can check what went over the wire without leaving the real client.
 */
export function recordingTransport() {
  const record = { urls: [], frames: new EventLog('client frames') }
  class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols)
      record.urls.push(String(url))
      this.on('message', (data, isBinary) => {
        if (!isBinary) record.frames.push(data.toString())
      })
    }
  }
  return { transport: RecordingWebSocket, record }
}
