// Row changes, broadcast and presence from Node with the official client, against walcast.
//   npm install && node listen.mjs        (with `walcast demo` running; Ctrl-C to stop)
// WALCAST_URL / WALCAST_KEY point it elsewhere (KEY: a JWT signed with walcast's JWT_SECRET).
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws' // Node 20 has no global WebSocket

const url = process.env.WALCAST_URL ?? 'http://localhost:4000'
const key = process.env.WALCAST_KEY ??
  (await (await fetch(`${url}/demo/token?user=node`)).json()).token // `walcast demo` hands out tokens
const supabase = createClient(url, key, { accessToken: async () => key, realtime: { transport: WebSocket } })

supabase.channel('todos')
  .on('postgres_changes', { event: '*', schema: 'public', table: 'todos' },
    (change) => console.log(change.eventType, change.new?.id ?? change.old?.id, change.new?.title ?? ''))
  .subscribe((status) => console.log('todos:', status))

const room = supabase.channel('room:lobby', { config: { private: true, presence: { key: 'node' } } })
room
  .on('presence', { event: 'sync' }, () => console.log('online:', Object.values(room.presenceState()).map((m) => m[0].name)))
  .on('broadcast', { event: 'cursor' }, ({ payload }) => console.log(`cursor ${payload.name} at ${payload.x},${payload.y}`))
  .subscribe(async (status) => {
    console.log('room:', status)
    if (status === 'SUBSCRIBED') await room.track({ name: 'node script', color: '#3c873a' })
  })
