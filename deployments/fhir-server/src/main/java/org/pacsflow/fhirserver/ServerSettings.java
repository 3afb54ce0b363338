package org.pacsflow.fhirserver;

import java.nio.file.Path;
import java.util.Map;
import java.util.Objects;

/**
 * What the launcher was asked for: the port, and either an H2 data directory or in-memory storage.
 *
 * <p>Each value is taken from, in order: the command line ({@code --port N}, {@code --data-dir DIR},
 * {@code --in-memory}), a system property ({@code -Dfhir.port}, {@code -Dfhir.dataDir},
 * {@code -Dfhir.inMemory=true}), the environment ({@code FHIR_PORT}, {@code FHIR_DATA_DIR},
 * {@code FHIR_IN_MEMORY=true}), then the default (port 8090, in-memory). The host is always 127.0.0.1.
 */
public final class ServerSettings {
    public static final String HOST = "127.0.0.1";
    public static final int DEFAULT_PORT = 8090;
    public static final String BASE_PATH = "/fhir";

    private final int port;
    private final Path dataDir; // null means in-memory
    private final boolean exitWhenReady;

    public ServerSettings(int port, Path dataDir) {
        this(port, dataDir, false);
    }

    public ServerSettings(int port, Path dataDir, boolean exitWhenReady) {
        if (port < 0 || port > 65535) {
            throw new IllegalArgumentException("port must be in 0..65535, got " + port);
        }
        this.port = port;
        this.dataDir = dataDir == null ? null : dataDir.toAbsolutePath().normalize();
        this.exitWhenReady = exitWhenReady;
    }

    /**
     * Start, answer one metadata and one $validate request, then exit (0 if both worked). build.sh
     * uses it as a smoke test and to record the class-data-sharing archive that makes later starts faster.
     */
    public boolean exitWhenReady() {
        return exitWhenReady;
    }

    public int port() {
        return port;
    }

    /** The H2 data directory, or null for an in-memory database. */
    public Path dataDir() {
        return dataDir;
    }

    public boolean inMemory() {
        return dataDir == null;
    }

    /** JDBC URL of the H2 database: a file {@code hapi-fhir.mv.db} under the data dir, or a named in-memory database. */
    public String jdbcUrl() {
        if (inMemory()) {
            return "jdbc:h2:mem:pacsflow_fhir;DB_CLOSE_DELAY=-1";
        }
        // DB_CLOSE_ON_EXIT=FALSE: our shutdown hook closes the pool, which closes the database cleanly.
        return "jdbc:h2:file:" + dataDir.resolve("hapi-fhir") + ";DB_CLOSE_ON_EXIT=FALSE";
    }

    public static ServerSettings parse(String[] args, Map<String, String> env) {
        String port = firstNonBlank(System.getProperty("fhir.port"), env.get("FHIR_PORT"));
        String dataDir = firstNonBlank(System.getProperty("fhir.dataDir"), env.get("FHIR_DATA_DIR"));
        boolean inMemory = Boolean.parseBoolean(
                firstNonBlank(System.getProperty("fhir.inMemory"), env.get("FHIR_IN_MEMORY")));
        boolean exitWhenReady = false;
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            switch (arg) {
                case "--port" -> port = valueAfter(args, i++);
                case "--data-dir" -> {
                    dataDir = valueAfter(args, i++);
                    inMemory = false;
                }
                case "--in-memory" -> inMemory = true;
                case "--exit-when-ready" -> exitWhenReady = true;
                case "--help", "-h" -> throw new UsageException(null);
                default -> {
                    if (arg.startsWith("--port=")) {
                        port = arg.substring("--port=".length());
                    } else if (arg.startsWith("--data-dir=")) {
                        dataDir = arg.substring("--data-dir=".length());
                        inMemory = false;
                    } else {
                        throw new UsageException("unknown argument: " + arg);
                    }
                }
            }
        }
        int portNumber;
        try {
            portNumber = port == null ? DEFAULT_PORT : Integer.parseInt(port.trim());
        } catch (NumberFormatException e) {
            throw new UsageException("port is not a number: " + port);
        }
        Path dir = (inMemory || dataDir == null) ? null : Path.of(dataDir);
        return new ServerSettings(portNumber, dir, exitWhenReady);
    }

    static String usage() {
        return String.join(System.lineSeparator(),
                "usage: java -Xmx1g -jar pacsflow-fhir-server.jar [--port N] [--data-dir DIR | --in-memory]",
                "  FHIR R4 (HAPI FHIR JPA, H2) on http://" + HOST + ":PORT" + BASE_PATH,
                "  --port N        TCP port on 127.0.0.1 (env FHIR_PORT, -Dfhir.port; default " + DEFAULT_PORT + ")",
                "  --data-dir DIR  keep the H2 database under DIR (env FHIR_DATA_DIR, -Dfhir.dataDir)",
                "  --in-memory     keep nothing on disk (env FHIR_IN_MEMORY=true; the default without a data dir)",
                "  --exit-when-ready  start, check /metadata and $validate, then exit (0 = healthy)");
    }

    private static String valueAfter(String[] args, int i) {
        if (i + 1 >= args.length) {
            throw new UsageException(args[i] + " needs a value");
        }
        return args[i + 1];
    }

    private static String firstNonBlank(String... values) {
        for (String v : values) {
            if (v != null && !v.isBlank()) {
                return v;
            }
        }
        return null;
    }

    @Override
    public String toString() {
        return "ServerSettings[host=" + HOST + ", port=" + port + ", storage="
                + (inMemory() ? "in-memory" : Objects.toString(dataDir)) + "]";
    }

    /** A bad command line; the message (if any) is shown before the usage text. */
    public static final class UsageException extends RuntimeException {
        public UsageException(String message) {
            super(message);
        }
    }
}
