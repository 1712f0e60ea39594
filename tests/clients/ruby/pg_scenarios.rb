# ruby-pg through the gateway: each scenario of tests/clients/contract.py, printed as one JSON
# line. ruby-pg drives the system's libpq, so SNI comes from host + hostaddr.

require 'json'
require 'pg'

def conninfo(sni: true, **extra)
  base = { port: ENV['PGSNI_PORT'], user: ENV['PGSNI_USER'], password: ENV['PGSNI_PASSWORD'],
           dbname: 'postgres', sslmode: 'verify-full', sslrootcert: ENV['PGSNI_CA'], connect_timeout: 20 }
  route = if sni
            { host: ENV['PGSNI_HOST'], hostaddr: ENV['PGSNI_ADDR'] }
          else
            { host: ENV['PGSNI_ADDR'], options: "endpoint=#{ENV['PGSNI_DB']}" }
          end
  base.merge(route).merge(extra)
end

# Yields a connection whose results come typed (integers as Integer), closed afterwards
def with_conn(**kw)
  conn = PG.connect(conninfo(**kw))
  conn.type_map_for_results = PG::BasicTypeMapForResults.new(conn)
  yield conn
ensure
  conn&.close
end

def value(conn, sql, params = [])
  conn.exec_params(sql, params).values[0][0]
end

def landing(**kw)
  with_conn(**kw) do |conn|
    %w[server_name data_directory tls].zip(conn.exec(ENV['PGSNI_LANDING_SQL']).values[0]).to_h
  end
end

def extended
  with_conn do |conn|
    sum, text, null = conn.exec_params(ENV['PGSNI_EXTENDED_SQL'], [40, 2, ENV['PGSNI_TEXT'], nil]).values[0]
    conn.prepare('plus10', ENV['PGSNI_PREPARED_SQL'])
    prepared = [1, 2].map { |x| conn.exec_prepared('plus10', [x]).values[0][0] }
    { sum: sum, text: text, null: null, prepared: prepared,
      server_prepared: value(conn, 'select count(*) from pg_prepared_statements') }
  end
end

def copy_summary(rows, sum, text)
  lines = text.split("\n")
  { rows_in: rows, sum_in: sum, out_lines: lines.size, out_first: lines.first, out_last: lines.last }
end

def copy
  data = (1..ENV['PGSNI_COPY_ROWS'].to_i).map { |i| "#{i}\trow #{i} é\n" }.join
  with_conn do |conn|
    conn.exec('create temp table t(id int, v text)')
    conn.copy_data('copy t from stdin') { conn.put_copy_data(data) }
    rows, sum = conn.exec('select count(*), sum(id) from t').values[0]
    out = +''
    conn.copy_data('copy (select * from t order by id) to stdout') do
      while (chunk = conn.get_copy_data)
        out << chunk
      end
    end
    copy_summary(rows, sum, out.force_encoding('UTF-8'))
  end
end

def notify
  with_conn do |conn|
    conn.exec('listen ruby_ch')
    conn.exec("notify ruby_ch, 'hello'")
    note_pid, payload = nil
    conn.wait_for_notify(5) { |_channel, pid, extra| note_pid, payload = pid, extra }
    { pid: conn.backend_pid, sql_pid: value(conn, 'select pg_backend_pid()'), note_pid: note_pid, payload: payload }
  end
end

def cancel
  with_conn do |conn|
    canceller = Thread.new { sleep 0.5; conn.cancel }
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    sqlstate = begin
      conn.exec(ENV['PGSNI_CANCEL_SQL'])
      nil
    rescue PG::Error => e
      e.result&.error_field(PG::PG_DIAG_SQLSTATE)
    end
    seconds = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
    canceller.join
    { sqlstate: sqlstate, seconds: seconds, after: value(conn, 'select 1') }
  end
end

def terminate
  with_conn do |conn|
    with_conn do |other|
      pid = conn.backend_pid
      result = { pid: pid, sql_pid: value(conn, 'select pg_backend_pid()'),
                 terminated: value(other, 'select pg_terminate_backend($1, 5000)', [pid]) }
      begin
        value(conn, 'select 1')
        result.merge(failed: false, detail: '')
      rescue PG::Error => e
        result.merge(failed: true, detail: e.message)
      end
    end
  end
end

def channel_binding
  # libpq refuses to finish a login without SCRAM-SHA-256-PLUS when channel_binding=require
  with_conn(channel_binding: 'require') { |conn| { mechanism: 'SCRAM-SHA-256-PLUS', one: value(conn, 'select 1') } }
end

SCENARIOS = {
  sni: -> { landing },
  endpoint: -> { landing(sni: false) },
  extended: -> { extended },
  copy: -> { copy },
  notify: -> { notify },
  cancel: -> { cancel },
  terminate: -> { terminate },
  channel_binding: -> { channel_binding },
}.freeze

results = SCENARIOS.to_h do |name, scenario|
  [name, scenario.call]
rescue StandardError => e
  [name, { error: "#{e.class}: #{e.message}" }]
end
puts JSON.generate(results)
