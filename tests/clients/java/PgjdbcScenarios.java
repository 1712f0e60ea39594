// pgjdbc through the gateway: each scenario of tests/clients/contract.py, printed as one JSON
// line. Run by tests/clients/test_pgjdbc.py as `java -cp postgresql.jar -Djdk.net.hosts.file=F
// PgjdbcScenarios.java`: F maps <db>.db.example.com to 127.0.0.1, so pgjdbc sends SNI without DNS.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Types;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class PgjdbcScenarios {
    static final Map<String, String> ENV = System.getenv();

    interface Scenario {
        Map<String, Object> run() throws Exception;
    }

    static Connection connect(boolean sni) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", ENV.get("PGSNI_USER"));
        props.setProperty("password", ENV.get("PGSNI_PASSWORD"));
        props.setProperty("sslmode", "verify-full");
        props.setProperty("sslrootcert", ENV.get("PGSNI_CA"));
        props.setProperty("connectTimeout", "20");
        props.setProperty("prepareThreshold", "1");  // named server-side statements from the first run
        String host = sni ? ENV.get("PGSNI_HOST") : ENV.get("PGSNI_ADDR");
        if (!sni) {
            props.setProperty("options", "endpoint=" + ENV.get("PGSNI_DB"));
        }
        return DriverManager.getConnection("jdbc:postgresql://" + host + ":" + ENV.get("PGSNI_PORT") + "/postgres", props);
    }

    static Object value(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getObject(1);
        }
    }

    static String jdbcSql(String sql) {
        return sql.replaceAll("\\$\\d+", "?");  // the contract's $n placeholders
    }

    static Map<String, Object> landing(boolean sni) throws SQLException {
        try (Connection conn = connect(sni); Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery(ENV.get("PGSNI_LANDING_SQL"))) {
            rs.next();
            Map<String, Object> r = new LinkedHashMap<>();
            r.put("server_name", rs.getString(1));
            r.put("data_directory", rs.getString(2));
            r.put("tls", rs.getString(3));
            return r;
        }
    }

    static Map<String, Object> extended() throws SQLException {
        Map<String, Object> r = new LinkedHashMap<>();
        try (Connection conn = connect(true)) {
            try (PreparedStatement ps = conn.prepareStatement(jdbcSql(ENV.get("PGSNI_EXTENDED_SQL")))) {
                ps.setInt(1, 40);
                ps.setInt(2, 2);
                ps.setString(3, ENV.get("PGSNI_TEXT"));
                ps.setNull(4, Types.VARCHAR);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    r.put("sum", rs.getInt(1));
                    r.put("text", rs.getString(2));
                    r.put("null", rs.getString(3));
                }
            }
            List<Object> prepared = new ArrayList<>();
            try (PreparedStatement ps = conn.prepareStatement(jdbcSql(ENV.get("PGSNI_PREPARED_SQL")))) {
                for (int x = 1; x <= 2; x++) {
                    ps.setInt(1, x);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        prepared.add(rs.getInt(1));
                    }
                }
            }
            r.put("prepared", prepared);
            r.put("server_prepared", ((Number) value(conn, "select count(*) from pg_prepared_statements")).intValue());
        }
        return r;
    }

    static Map<String, Object> copy() throws Exception {
        int n = Integer.parseInt(ENV.get("PGSNI_COPY_ROWS"));
        StringBuilder data = new StringBuilder();
        for (int i = 1; i <= n; i++) {
            data.append(i).append("\trow ").append(i).append(" é\n");
        }
        Map<String, Object> r = new LinkedHashMap<>();
        try (Connection conn = connect(true); Statement st = conn.createStatement()) {
            st.execute("create temp table t(id int, v text)");
            CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
            copy.copyIn("copy t from stdin", new StringReader(data.toString()));
            try (ResultSet rs = st.executeQuery("select count(*), sum(id) from t")) {
                rs.next();
                r.put("rows_in", rs.getLong(1));
                r.put("sum_in", rs.getLong(2));
            }
            StringWriter out = new StringWriter();
            copy.copyOut("copy (select * from t order by id) to stdout", out);
            String[] lines = out.toString().split("\n");
            r.put("out_lines", lines.length);
            r.put("out_first", lines[0]);
            r.put("out_last", lines[lines.length - 1]);
        }
        return r;
    }

    static Map<String, Object> notifyScenario() throws SQLException {
        Map<String, Object> r = new LinkedHashMap<>();
        try (Connection conn = connect(true); Statement st = conn.createStatement()) {
            PGConnection pg = conn.unwrap(PGConnection.class);
            st.execute("listen jdbc_ch");
            st.execute("notify jdbc_ch, 'hello'");
            PGNotification[] notes = pg.getNotifications(5000);
            r.put("pid", pg.getBackendPID());
            r.put("sql_pid", value(conn, "select pg_backend_pid()"));
            r.put("note_pid", notes.length > 0 ? notes[0].getPID() : null);
            r.put("payload", notes.length > 0 ? notes[0].getParameter() : null);
        }
        return r;
    }

    static Map<String, Object> cancel() throws Exception {
        Map<String, Object> r = new LinkedHashMap<>();
        try (Connection conn = connect(true); Statement st = conn.createStatement()) {
            Thread canceller = new Thread(() -> {
                try {
                    Thread.sleep(500);
                    st.cancel();
                } catch (Exception e) {
                    throw new RuntimeException(e);
                }
            });
            long started = System.nanoTime();
            canceller.start();
            try {
                st.executeQuery(ENV.get("PGSNI_CANCEL_SQL"));
                r.put("sqlstate", null);
            } catch (SQLException e) {
                r.put("sqlstate", e.getSQLState());
            }
            r.put("seconds", (System.nanoTime() - started) / 1e9);
            canceller.join();
            r.put("after", value(conn, "select 1"));
        }
        return r;
    }

    static Map<String, Object> terminate() throws SQLException {
        Map<String, Object> r = new LinkedHashMap<>();
        try (Connection conn = connect(true); Connection other = connect(true)) {
            int pid = conn.unwrap(PGConnection.class).getBackendPID();
            r.put("pid", pid);
            r.put("sql_pid", value(conn, "select pg_backend_pid()"));
            try (PreparedStatement ps = other.prepareStatement("select pg_terminate_backend(?, 5000)")) {
                ps.setInt(1, pid);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    r.put("terminated", rs.getBoolean(1));
                }
            }
            try {
                value(conn, "select 1");
                r.put("failed", false);
                r.put("detail", "");
            } catch (SQLException e) {
                r.put("failed", true);
                r.put("detail", e.getSQLState() + " " + e.getMessage());
            }
        }
        return r;
    }

    static String json(Object o) {
        if (o == null) {
            return "null";
        }
        if (o instanceof Number || o instanceof Boolean) {
            return o.toString();
        }
        if (o instanceof Map) {
            List<String> parts = new ArrayList<>();
            for (Map.Entry<?, ?> e : ((Map<?, ?>) o).entrySet()) {
                parts.add(json(e.getKey().toString()) + ":" + json(e.getValue()));
            }
            return "{" + String.join(",", parts) + "}";
        }
        if (o instanceof List) {
            List<String> parts = new ArrayList<>();
            for (Object item : (List<?>) o) {
                parts.add(json(item));
            }
            return "[" + String.join(",", parts) + "]";
        }
        StringBuilder s = new StringBuilder("\"");
        for (char c : o.toString().toCharArray()) {
            if (c == '"' || c == '\\') {
                s.append('\\').append(c);
            } else if (c < 0x20) {
                s.append(String.format("\\u%04x", (int) c));
            } else {
                s.append(c);
            }
        }
        return s.append('"').toString();
    }

    public static void main(String[] args) {
        Map<String, Scenario> scenarios = new LinkedHashMap<>();
        scenarios.put("sni", () -> landing(true));
        scenarios.put("endpoint", () -> landing(false));
        scenarios.put("extended", PgjdbcScenarios::extended);
        scenarios.put("copy", PgjdbcScenarios::copy);
        scenarios.put("notify", PgjdbcScenarios::notifyScenario);
        scenarios.put("cancel", PgjdbcScenarios::cancel);
        scenarios.put("terminate", PgjdbcScenarios::terminate);
        Map<String, Object> results = new LinkedHashMap<>();
        for (Map.Entry<String, Scenario> e : scenarios.entrySet()) {
            try {
                results.put(e.getKey(), e.getValue().run());
            } catch (Exception ex) {
                Map<String, Object> failed = new LinkedHashMap<>();
                failed.put("error", ex.toString());
                results.put(e.getKey(), failed);
            }
        }
        System.out.println(json(results));
    }
}
