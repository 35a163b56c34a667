// One fault-suite subscriber: the official client (@supabase/supabase-js, pinned in
// tests/e2e/node) on one socket, with up to two channels, printing one JSON line per thing it
// sees on stdout. Driven by the FAULTS_SUB environment variable (JSON):
//
//   { "url": "http://127.0.0.1:PORT", "token": JWT, "name": "alice",
//     "changes": { "topic": "changes-alice", "tables": ["events", "secured"], "shape": false },
//     "room": { "topic": "room", "presenceKey": "alice" } }
//
// `changes` joins a channel with one INSERT postgres_changes binding per table; `room` joins a
// channel with broadcast (self: false) and presence under `presenceKey` (tracked once joined).
// Either may be absent. Every line carries `t`, the wall clock in ms when it was printed.
//
//   {"k":"socket","event":"open"|"close"|"error","code":1006}
//   {"k":"status","ch":"changes"|"room","status":"SUBSCRIBED"|"CHANNEL_ERROR"|"TIMED_OUT"|"CLOSED","err":null}
//   {"k":"change","table":"events","type":"INSERT","id":123,"shape":{"id":"number",...}}   (shape only if asked)
//   {"k":"system","ch":"changes","status":"error","extension":"postgres_changes","message":"..."}
//   {"k":"broadcast","event":"tick","n":5,"bytes":12}
//   {"k":"presence","event":"sync"|"join"|"leave","keys":["alice",...]}   (sync: every key in the state)
//   {"k":"sent","event":"tick","n":5,"result":"ok"}
//   {"k":"error","message":"..."}
//   {"k":"out"}                                   the client sent a frame (only with sessionId)
//
// With `"sessionId": "…"` the socket carries the `session_id` parameter (session resume).
//
// Commands, one JSON object per line on stdin:
//   {"cmd":"broadcast","event":"tick","n":5}                  one broadcast on the room channel
//   {"cmd":"flood","event":"big","count":600,"bytes":100000,"perSecond":200}   many large ones
//   {"cmd":"exit"}                                             remove channels, disconnect, exit

import { createRequire } from 'node:module'
import readline from 'node:readline'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

// The pinned client of the end-to-end suite; no second package.json.
const here = path.dirname(fileURLToPath(import.meta.url))
const require = createRequire(path.join(here, '../../e2e/node/package.json'))
const { createClient } = require('@supabase/supabase-js')
const WebSocket = require('ws')

const cfg = JSON.parse(process.env.FAULTS_SUB ?? 'null')
if (!cfg) {
  console.error('FAULTS_SUB is not set')
  process.exit(2)
}

function out(obj) {
  process.stdout.write(JSON.stringify({ ...obj, t: Date.now() }) + '\n')
}

// The client's own transport, subclassed only to report socket open/close.
class ReportingWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols)
    this.on('open', () => out({ k: 'socket', event: 'open' }))
    this.on('close', (code) => out({ k: 'socket', event: 'close', code }))
    this.on('error', (e) => out({ k: 'socket', event: 'error', message: String(e.message ?? e) }))
  }

  send(data, ...rest) {
    // When the client last spoke bounds what a resumed session may repeat.
    if (cfg.sessionId) out({ k: 'out' })
    return super.send(data, ...rest)
  }
}

const supabase = createClient(cfg.url, cfg.token, {
  auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
  realtime: {
    transport: ReportingWebSocket,
    // A resumed session may repeat what arrived after the client last spoke: a short
    // heartbeat keeps that window small (and the test's repeat check meaningful).
    ...(cfg.sessionId ? { params: { session_id: cfg.sessionId }, heartbeatIntervalMs: 1000 } : {}),
  },
})

function jsonType(v) {
  if (v === null) return 'null'
  if (Array.isArray(v)) return 'array'
  return typeof v
}

let room = null
const channels = []

// Subscribing waits a tick so the client has its access token first (see tests/e2e).
setTimeout(() => {
  if (cfg.changes) {
    const ch = supabase.channel(cfg.changes.topic)
    for (const table of cfg.changes.tables) {
      ch.on('postgres_changes', { event: 'INSERT', schema: 'public', table }, (p) => {
        const rec = p.new ?? {}
        const line = { k: 'change', table: p.table, type: p.eventType, id: rec.id }
        if (cfg.changes.shape) {
          line.shape = Object.fromEntries(Object.entries(rec).map(([k, v]) => [k, jsonType(v)]))
        }
        out(line)
      })
    }
    ch.on('system', {}, (p) =>
      out({ k: 'system', ch: 'changes', status: p.status, extension: p.extension, message: p.message }),
    )
    ch.subscribe((status, err) =>
      out({ k: 'status', ch: 'changes', status, err: err ? String(err.message ?? err) : null }),
    )
    channels.push(ch)
  }
  if (cfg.room) {
    const key = cfg.room.presenceKey
    room = supabase.channel(cfg.room.topic, {
      config: { broadcast: { self: false }, presence: { key } },
    })
    room.on('broadcast', { event: '*' }, (m) => {
      const p = m.payload ?? {}
      out({ k: 'broadcast', event: m.event, n: p.n ?? null, bytes: JSON.stringify(p).length })
    })
    room.on('presence', { event: 'sync' }, () =>
      out({ k: 'presence', event: 'sync', keys: Object.keys(room.presenceState()).sort() }),
    )
    room.on('presence', { event: 'join' }, ({ key: k }) => out({ k: 'presence', event: 'join', keys: [k] }))
    room.on('presence', { event: 'leave' }, ({ key: k }) => out({ k: 'presence', event: 'leave', keys: [k] }))
    room.on('system', {}, (p) =>
      out({ k: 'system', ch: 'room', status: p.status, extension: p.extension, message: p.message }),
    )
    room.subscribe(async (status, err) => {
      out({ k: 'status', ch: 'room', status, err: err ? String(err.message ?? err) : null })
      if (status === 'SUBSCRIBED') {
        const r = await room.track({ name: key })
        if (r !== 'ok') out({ k: 'error', message: `track answered ${r}` })
      }
    })
    channels.push(room)
  }
}, 0)

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms))
}

async function broadcast(event, payload) {
  if (!room) {
    out({ k: 'error', message: 'broadcast without a room channel' })
    return
  }
  const result = await room.send({ type: 'broadcast', event, payload })
  out({ k: 'sent', event, n: payload.n, result })
}

async function command(c) {
  switch (c.cmd) {
    case 'broadcast':
      await broadcast(c.event ?? 'tick', { n: c.n })
      break
    case 'flood': {
      const pad = 'x'.repeat(c.bytes)
      const gap = 1000 / (c.perSecond ?? 200)
      for (let i = 0; i < c.count; i++) {
        await broadcast(c.event ?? 'big', { n: i, pad })
        await sleep(gap)
      }
      break
    }
    case 'exit':
      await Promise.race([supabase.removeAllChannels(), sleep(2000)])
      supabase.realtime.disconnect()
      process.exit(0)
      break
    default:
      out({ k: 'error', message: `unknown command ${JSON.stringify(c)}` })
  }
}

// Commands run one after the other, in the order they came.
let queue = Promise.resolve()
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.trim()) return
  let c
  try {
    c = JSON.parse(line)
  } catch (e) {
    out({ k: 'error', message: `bad command line: ${line}` })
    return
  }
  queue = queue.then(() => command(c)).catch((e) => out({ k: 'error', message: String(e?.stack ?? e) }))
})
// The test went away: leave too.
process.stdin.on('end', () => process.exit(0))
