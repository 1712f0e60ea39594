'use strict'
// Shared by the node scenario scripts: the target and the contract's constants from the
// PGSNI_* environment (tests/clients/conftest.py), the COPY data, and the runner that prints
// one JSON line of results (tests/clients/contract.py says what each result holds).

const fs = require('fs')

const env = process.env
const target = {
  port: Number(env.PGSNI_PORT),
  ca: fs.readFileSync(env.PGSNI_CA),
  db: env.PGSNI_DB,
  host: env.PGSNI_HOST,
  addr: env.PGSNI_ADDR,
  user: env.PGSNI_USER,
  password: env.PGSNI_PASSWORD,
}
const contract = {
  landingSql: env.PGSNI_LANDING_SQL,
  extendedSql: env.PGSNI_EXTENDED_SQL,
  preparedSql: env.PGSNI_PREPARED_SQL,
  text: env.PGSNI_TEXT,
  cancelSql: env.PGSNI_CANCEL_SQL,
  copyRows: Number(env.PGSNI_COPY_ROWS),
}

const copyLine = (i) => `${i}\trow ${i} é`

function copyData() {
  const lines = []
  for (let i = 1; i <= contract.copyRows; i++) lines.push(copyLine(i) + '\n')
  return lines.join('')
}

function copySummary(rowsIn, sumIn, text) {
  const lines = text.split('\n').filter((l) => l.length > 0)
  return { rows_in: rowsIn, sum_in: sumIn, out_lines: lines.length, out_first: lines[0], out_last: lines[lines.length - 1] }
}

const landing = ([server_name, data_directory, tls]) => ({ server_name, data_directory, tls })

function timeout(ms, name) {
  return new Promise((_, reject) => setTimeout(() => reject(new Error(`${name}: no result after ${ms} ms`)), ms).unref())
}

// Runs every scenario in turn (a failure is reported in its own result) and exits: a pool or
// socket left open by a failed scenario must not keep the process alive.
async function runAll(scenarios) {
  const results = {}
  for (const [name, fn] of Object.entries(scenarios)) {
    try {
      results[name] = await Promise.race([fn(), timeout(40000, name)])
    } catch (e) {
      results[name] = { error: String((e && e.stack) || e) }
    }
  }
  process.stdout.write(JSON.stringify(results) + '\n')
  process.exit(0)
}

module.exports = { target, contract, copyData, copySummary, landing, runAll }
