'use strict'
// node-postgres (`pg`, with pg-copy-streams) through the gateway: each scenario of
// tests/clients/contract.py, printed as one JSON line.

const { pipeline } = require('stream/promises')
const { Readable } = require('stream')
const pg = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const { target, contract, copyData, copySummary, landing, runAll } = require('./common')

function config({ sni = true, ...extra } = {}) {
  const base = { host: target.addr, port: target.port, user: target.user, password: target.password,
    database: 'postgres', connectionTimeoutMillis: 20000 }
  if (sni) return { ...base, ssl: { ca: target.ca, servername: target.host }, ...extra }
  return { ...base, ssl: { ca: target.ca }, options: `endpoint=${target.db}`, ...extra }
}

async function connect(opts) {
  const client = new pg.Client(config(opts))
  await client.connect()
  return client
}

async function value(client, text, values = []) {
  return (await client.query({ text, values, rowMode: 'array' })).rows[0][0]
}

async function landingOf(client) {
  try {
    return landing((await client.query({ text: contract.landingSql, rowMode: 'array' })).rows[0])
  } finally {
    await client.end()
  }
}

async function extended() {
  const client = await connect()
  try {
    const [sum, text, nul] = (await client.query({ text: contract.extendedSql, rowMode: 'array',
      values: [40, 2, contract.text, null] })).rows[0]
    const prepared = []
    for (const x of [1, 2]) {
      prepared.push((await client.query({ name: 'plus10', text: contract.preparedSql, values: [x], rowMode: 'array' })).rows[0][0])
    }
    const count = await value(client, 'select count(*)::int from pg_prepared_statements')
    return { sum, text, null: nul, prepared, server_prepared: count }
  } finally {
    await client.end()
  }
}

async function copy() {
  const client = await connect()
  try {
    await client.query('create temp table t(id int, v text)')
    await pipeline(Readable.from([copyData()]), client.query(copyFrom('copy t from stdin')))
    const [rows, sum] = (await client.query({ text: 'select count(*)::int, sum(id)::int from t', rowMode: 'array' })).rows[0]
    const chunks = []
    for await (const chunk of client.query(copyTo('copy (select * from t order by id) to stdout'))) chunks.push(chunk)
    return copySummary(rows, sum, Buffer.concat(chunks).toString('utf8'))
  } finally {
    await client.end()
  }
}

async function notify() {
  const client = await connect()
  try {
    await client.query('listen node_pg_ch')
    const note = new Promise((resolve) => client.once('notification', resolve))
    await client.query("notify node_pg_ch, 'hello'")
    const n = await note
    return { pid: client.processID, sql_pid: await value(client, 'select pg_backend_pid()'), note_pid: n.processId, payload: n.payload }
  } finally {
    await client.end()
  }
}

async function cancel() {
  const client = await connect()
  try {
    // pg's cancel(client, query) wants the Query object itself, so submit one
    const query = new pg.Query(contract.cancelSql)
    const started = Date.now()
    const failed = new Promise((resolve) => { query.on('error', resolve); query.on('end', () => resolve(null)) })
    client.query(query)
    await new Promise((r) => setTimeout(r, 500))
    const canceller = new pg.Client(config())
    canceller.connection.on('error', () => {}) // the gateway closes the cancel connection, as Postgres does
    canceller.cancel(client, query)
    const error = await failed
    return { sqlstate: error && error.code, seconds: (Date.now() - started) / 1000, after: await value(client, 'select 1') }
  } finally {
    await client.end()
  }
}

async function terminate() {
  const client = await connect()
  const other = await connect()
  const asyncErrors = []
  client.on('error', (e) => asyncErrors.push(`${e.code} ${e.message}`)) // the backend's FATAL arrives unasked
  try {
    const pid = client.processID
    const sqlPid = await value(client, 'select pg_backend_pid()')
    const terminated = await value(other, 'select pg_terminate_backend($1, 5000)', [pid])
    let failed = false
    let detail = ''
    try {
      await value(client, 'select 1')
    } catch (e) {
      failed = true
      detail = `${e.message} (connection errors: ${asyncErrors.join('; ')})`
    }
    return { pid, sql_pid: sqlPid, terminated, failed, detail }
  } finally {
    await other.end()
  }
}

async function channelBinding() {
  const client = new pg.Client(config({ enableChannelBinding: true }))
  let mechanism = null
  const send = client.connection.sendSASLInitialResponseMessage.bind(client.connection)
  client.connection.sendSASLInitialResponseMessage = (mech, response) => { mechanism = mech; return send(mech, response) }
  await client.connect()
  try {
    return { mechanism, one: await value(client, 'select 1') }
  } finally {
    await client.end()
  }
}

runAll({
  sni: async () => landingOf(await connect()),
  endpoint: async () => landingOf(await connect({ sni: false })),
  extended,
  copy,
  notify,
  cancel,
  terminate,
  channel_binding: channelBinding,
  direct_tls: async () => landingOf(await connect({ sslnegotiation: 'direct' })),
})
