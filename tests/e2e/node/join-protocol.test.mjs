// Channel lifecycle at the frame level (raw `ws`, vsn 2.0.0): the join reply echoes the
// bindings, the "Subscribed to PostgreSQL" system message, change frames, bad filters,
// duplicate joins, phx_leave and pushes to unjoined topics.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  suffix, sql, closeSql, ensureRoles, createTable, mintToken, rawConnect, joinFrame, COMMIT_TS,
} from './helpers.mjs'

const sfx = suffix()
const table = `join_${sfx}`
let token

before(async () => {
  await ensureRoles()
  await createTable(table, 'id int4 PRIMARY KEY, title text')
  token = mintToken()
})

after(async () => {
  await closeSql()
})

const isFrame = (joinRef, ref, topic, event) => (f) =>
  Array.isArray(f) && f[0] === joinRef && f[1] === ref && f[2] === topic && f[3] === event

test('join reply echoes the bindings with integer ids, then the system ok message', async () => {
  const sock = await rawConnect({ token })
  try {
    const name = `join-echo-${sfx}`
    const topic = `realtime:${name}`
    const bindings = [
      { event: '*', schema: 'public', table },
      { event: 'insert', schema: 'public', table, filter: 'id=gt.5' },
    ]
    sock.send(joinFrame('1', topic, bindings, token))
    const reply = await sock.next(isFrame('1', '1', topic, 'phx_reply'), 'the join reply')
    assert.equal(reply[4].status, 'ok', JSON.stringify(reply))
    const echoed = reply[4].response.postgres_changes
    assert.equal(echoed.length, 2)
    for (const [i, b] of echoed.entries()) {
      assert.ok(Number.isInteger(b.id), `binding ${i} has an integer id: ${JSON.stringify(b)}`)
      const { id, ...rest } = b
      assert.deepStrictEqual(rest, bindings[i], 'echoed verbatim, same order')
    }
    assert.notEqual(echoed[0].id, echoed[1].id)

    const system = await sock.next((f) => Array.isArray(f) && f[2] === topic && f[3] === 'system', 'the system message')
    assert.deepStrictEqual(system, ['1', null, topic, 'system', {
      extension: 'postgres_changes',
      status: 'ok',
      message: 'Subscribed to PostgreSQL',
      channel: name,
    }])

    // A change matching both bindings comes once, carrying both ids.
    await sql(`INSERT INTO public."${table}" (id, title) VALUES (10, 'ten')`)
    const change = await sock.next((f) => Array.isArray(f) && f[3] === 'postgres_changes', 'the change')
    assert.equal(change[0], null)
    assert.equal(change[1], null)
    assert.equal(change[2], topic)
    const { ids, data } = change[4]
    assert.deepStrictEqual([...ids].sort(), [echoed[0].id, echoed[1].id].sort())
    assert.match(data.commit_timestamp, COMMIT_TS)
    const { commit_timestamp, ...rest } = data
    assert.deepStrictEqual(rest, {
      schema: 'public',
      table,
      type: 'INSERT',
      columns: [{ name: 'id', type: 'int4' }, { name: 'title', type: 'text' }],
      record: { id: 10, title: 'ten' },
      errors: null,
    })

    // A change matching only the '*' binding carries only its id.
    await sql(`INSERT INTO public."${table}" (id, title) VALUES (1, 'one')`)
    const second = await sock.next(
      (f) => Array.isArray(f) && f[3] === 'postgres_changes' && f[4].data.record.id === 1,
      'the second change',
    )
    assert.deepStrictEqual(second[4].ids, [echoed[0].id])
    assert.equal(sock.frames.items.filter((f) => f[3] === 'postgres_changes').length, 2)
  } finally {
    sock.close()
  }
})

test('an empty postgres_changes list is answered with an empty list', async () => {
  const sock = await rawConnect({ token })
  try {
    const topic = `realtime:join-empty-${sfx}`
    sock.send(joinFrame('1', topic, [], token))
    const reply = await sock.next(isFrame('1', '1', topic, 'phx_reply'), 'the join reply')
    assert.deepStrictEqual(reply[4], { status: 'ok', response: { postgres_changes: [] } })
  } finally {
    sock.close()
  }
})

test('a binding with an unknown filter column gets a system error naming it', async () => {
  const sock = await rawConnect({ token })
  try {
    const name = `join-badcol-${sfx}`
    const topic = `realtime:${name}`
    sock.send(joinFrame('1', topic, [{ event: '*', schema: 'public', table, filter: 'nope_col=eq.1' }], token))
    const system = await sock.next(
      (f) => Array.isArray(f) && f[2] === topic && f[3] === 'system' && f[4].status === 'error',
      'a system error',
    )
    assert.equal(system[0], '1', 'stamped with the join_ref')
    assert.equal(system[1], null)
    assert.equal(system[4].extension, 'postgres_changes')
    assert.equal(system[4].channel, name)
    assert.match(system[4].message, /nope_col/)
  } finally {
    sock.close()
  }
})

test('a binding with an unknown operator gets a system error', async () => {
  const sock = await rawConnect({ token })
  try {
    const name = `join-badop-${sfx}`
    const topic = `realtime:${name}`
    sock.send(joinFrame('1', topic, [{ event: '*', schema: 'public', table, filter: 'id=between.1' }], token))
    const system = await sock.next(
      (f) => Array.isArray(f) && f[2] === topic && f[3] === 'system' && f[4].status === 'error',
      'a system error',
    )
    assert.equal(system[4].extension, 'postgres_changes')
    assert.equal(system[4].channel, name)
    assert.equal(typeof system[4].message, 'string')
  } finally {
    sock.close()
  }
})

test('a second join on the same topic closes the old join first', async () => {
  const sock = await rawConnect({ token })
  try {
    const topic = `realtime:join-dup-${sfx}`
    sock.send(joinFrame('1', topic, [], token))
    await sock.next(isFrame('1', '1', topic, 'phx_reply'), 'the first join reply')
    sock.send(joinFrame('5', topic, [], token))
    const reply = await sock.next(isFrame('5', '5', topic, 'phx_reply'), 'the second join reply')
    assert.equal(reply[4].status, 'ok')
    const frames = sock.frames.items
    const closeIdx = frames.findIndex((f) => f[2] === topic && f[3] === 'phx_close')
    const replyIdx = frames.indexOf(reply)
    assert.ok(closeIdx >= 0, `a phx_close for the old join; frames: ${JSON.stringify(frames)}`)
    assert.ok(closeIdx < replyIdx, 'phx_close comes before the new join reply')
    assert.deepStrictEqual(frames[closeIdx], ['1', '1', topic, 'phx_close', {}])
  } finally {
    sock.close()
  }
})

test('phx_leave: ok reply, then phx_close; a later push is an unmatched topic', async () => {
  const sock = await rawConnect({ token })
  try {
    const topic = `realtime:join-leave-${sfx}`
    sock.send(joinFrame('3', topic, [], token))
    await sock.next(isFrame('3', '3', topic, 'phx_reply'), 'the join reply')
    sock.send(['3', '4', topic, 'phx_leave', {}])
    const reply = await sock.next(isFrame('3', '4', topic, 'phx_reply'), 'the leave reply')
    assert.deepStrictEqual(reply[4], { status: 'ok', response: {} })
    const close = await sock.next((f) => f[2] === topic && f[3] === 'phx_close', 'phx_close')
    assert.deepStrictEqual(close, ['3', '3', topic, 'phx_close', {}])
    assert.ok(sock.frames.items.indexOf(reply) < sock.frames.items.indexOf(close))

    sock.send(['3', '6', topic, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }])
    const err = await sock.next((f) => f[1] === '6', 'the reply to a push after leaving')
    assert.deepStrictEqual(err, [null, '6', topic, 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }])
  } finally {
    sock.close()
  }
})

test('a push to a topic never joined gets "unmatched topic"', async () => {
  const sock = await rawConnect({ token })
  try {
    const topic = `realtime:never-joined-${sfx}`
    sock.send([null, '9', topic, 'broadcast', { type: 'broadcast', event: 'e', payload: { a: 1 } }])
    const reply = await sock.next((f) => f[1] === '9', 'the reply')
    assert.deepStrictEqual(reply, [null, '9', topic, 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }])
  } finally {
    sock.close()
  }
})

test('vsn 1.0.0 join: object frames, reply without join_ref', async () => {
  const sock = await rawConnect({ token, vsn: '1.0.0' })
  try {
    const name = `join-v1-${sfx}`
    const topic = `realtime:${name}`
    const bindings = [{ event: 'UPDATE', schema: 'public', table, filter: 'id=eq.1' }]
    const [, , , , payload] = joinFrame('1', topic, bindings, token)
    sock.send({ topic, event: 'phx_join', payload, ref: '1', join_ref: '1' })
    const reply = await sock.next((f) => f.topic === topic && f.event === 'phx_reply' && f.ref === '1', 'the join reply')
    assert.deepStrictEqual(Object.keys(reply).sort(), ['event', 'payload', 'ref', 'topic'])
    assert.equal(reply.payload.status, 'ok')
    const [{ id, ...rest }] = reply.payload.response.postgres_changes
    assert.ok(Number.isInteger(id))
    assert.deepStrictEqual(rest, bindings[0])
    const system = await sock.next((f) => f.topic === topic && f.event === 'system', 'the system message')
    assert.deepStrictEqual(system, {
      topic, event: 'system', ref: null,
      payload: { extension: 'postgres_changes', status: 'ok', message: 'Subscribed to PostgreSQL', channel: name },
    })
  } finally {
    sock.close()
  }
})
