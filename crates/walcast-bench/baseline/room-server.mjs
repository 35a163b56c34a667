// Baseline for `broadcast-fanout`: a WebSocket room server written the way tutorials write
// one with the `ws` package. Rooms are Sets of sockets; every incoming message is parsed,
// and a broadcast is serialized once and sent to each other member with ws.send().
//
// It speaks just enough of the Supabase Realtime vsn 2.0.0 text protocol for the load
// generator: phx_join (reply ok), heartbeat (reply ok), broadcast (relay to the room,
// sender excluded), phx_leave. No auth, no presence, no binary frames.
//
//   node room-server.mjs <port>

import { WebSocketServer } from 'ws'

const port = Number(process.argv[2] || 4100)
const rooms = new Map() // topic -> Set<WebSocket>

const wss = new WebSocketServer({ port, host: '127.0.0.1' })

wss.on('connection', (ws) => {
  ws.topics = new Set()
  ws.on('message', (data) => {
    let msg
    try {
      msg = JSON.parse(data.toString())
    } catch {
      return
    }
    const [joinRef, ref, topic, event, payload] = msg
    if (event === 'heartbeat') {
      ws.send(JSON.stringify([null, ref, topic, 'phx_reply', { status: 'ok', response: {} }]))
    } else if (event === 'phx_join') {
      if (!rooms.has(topic)) rooms.set(topic, new Set())
      rooms.get(topic).add(ws)
      ws.topics.add(topic)
      ws.send(JSON.stringify([joinRef, ref, topic, 'phx_reply', { status: 'ok', response: { postgres_changes: [] } }]))
    } else if (event === 'phx_leave') {
      rooms.get(topic)?.delete(ws)
      ws.topics.delete(topic)
      ws.send(JSON.stringify([joinRef, ref, topic, 'phx_reply', { status: 'ok', response: {} }]))
    } else if (event === 'broadcast') {
      const room = rooms.get(topic)
      if (!room) return
      const out = JSON.stringify([null, null, topic, 'broadcast', payload])
      for (const client of room) {
        if (client !== ws && client.readyState === 1) {
          client.send(out)
        }
      }
    }
  })
  ws.on('close', () => {
    for (const topic of ws.topics) rooms.get(topic)?.delete(ws)
  })
})

wss.on('listening', () => console.log(`listening on ${port}`))
