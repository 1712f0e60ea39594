'use strict'
// postgres.js (npm `postgres`) through the gateway: each scenario of tests/clients/contract.py,
// printed as one JSON line. Every pool has max: 1, so a scenario's queries share one session.

const { pipeline } = require('stream/promises')
const { Readable } = require('stream')
const postgres = require('postgres')
const { target, contract, copyData, copySummary, landing, runAll } = require('./common')

function options({ sni = true, ...extra } = {}) {
  const base = { host: target.addr, port: target.port, user: target.user, password: target.password,
    database: 'postgres', max: 1, connect_timeout: 20, onnotice: () => {} }
  if (sni) return { ...base, ssl: { ca: target.ca, servername: target.host }, ...extra }
  return { ...base, ssl: { ca: target.ca }, connection: { options: `endpoint=${target.db}` }, ...extra }
}

// Runs fn(sql) on a new pool and always ends the pool
async function withSql(opts, fn) {
  const sql = postgres(options(opts))
  try {
    return await fn(sql)
  } finally {
    await sql.end({ timeout: 5 })
  }
}

const first = async (query) => (await query.values())[0]

const landingOf = (opts) => withSql(opts, async (sql) => landing(await first(sql.unsafe(contract.landingSql))))

const extended = () => withSql({}, async (sql) => {
  const [sum, text, nul] = await first(sql.unsafe(contract.extendedSql, [40, 2, contract.text, null], { prepare: true }))
  const prepared = []
  for (const x of [1, 2]) prepared.push((await first(sql.unsafe(contract.preparedSql, [x], { prepare: true })))[0])
  const [count] = await first(sql`select count(*)::int from pg_prepared_statements`)
  return { sum, text, null: nul, prepared, server_prepared: count }
})

const copy = () => withSql({}, async (sql) => {
  await sql`create temp table t(id int, v text)`
  await pipeline(Readable.from([copyData()]), await sql`copy t from stdin`.writable())
  const [rows, sum] = await first(sql`select count(*)::int, sum(id)::int from t`)
  const chunks = []
  for await (const chunk of await sql`copy (select * from t order by id) to stdout`.readable()) chunks.push(chunk)
  return copySummary(rows, sum, Buffer.concat(chunks).toString('utf8'))
})

async function notify() {
  // `onnotify` sees the notifications of the pool's own connections (sql.listen would open a
  // connection of its own); postgres.js passes it no sender pid
  let note
  const received = new Promise((resolve) => { note = resolve })
  return withSql({ onnotify: (channel, payload) => note(payload) }, async (sql) => {
    await sql`listen pgjs_ch`
    const rows = await sql`select pg_backend_pid()`.values()
    await sql`notify pgjs_ch, 'hello'`
    return { pid: rows.state.pid, sql_pid: rows[0][0], note_pid: null, payload: await received }
  })
}

const cancel = () => withSql({}, async (sql) => {
  const query = sql.unsafe(contract.cancelSql)
  const started = Date.now()
  setTimeout(() => query.cancel(), 500)
  let sqlstate = null
  try {
    await query
  } catch (e) {
    sqlstate = e.code
  }
  const seconds = (Date.now() - started) / 1000
  return { sqlstate, seconds, after: (await first(sql`select 1`))[0] }
})

const sleep = (ms, value) => new Promise((resolve) => setTimeout(() => resolve(value), ms))

const terminate = () => withSql({}, async (other) => {
  // A pool reconnects by itself, and a reserved connection's next query crashes postgres.js
  // 3.4.9 (on a direct connection too): "failed" is the pool's onclose for the session
  let closed
  const wasClosed = new Promise((resolve) => { closed = resolve })
  const sql = postgres(options({ onclose: () => closed(true) }))
  try {
    const rows = await sql`select pg_backend_pid()`.values()
    const pid = rows.state.pid
    const [terminated] = await first(other`select pg_terminate_backend(${pid}, 5000)`)
    const failed = await Promise.race([wasClosed, sleep(5000, false)])
    const [newPid] = await first(sql`select pg_backend_pid()`)
    return { pid, sql_pid: rows[0][0], terminated, failed, new_pid: newPid,
      detail: `onclose ${failed ? 'called' : 'not called'}; the next query ran on pid ${newPid}` }
  } finally {
    await sql.end({ timeout: 1 })
  }
})

runAll({
  sni: () => landingOf({}),
  endpoint: () => landingOf({ sni: false }),
  extended,
  copy,
  notify,
  cancel,
  terminate,
  direct_tls: () => landingOf({ sslnegotiation: 'direct' }),
})
