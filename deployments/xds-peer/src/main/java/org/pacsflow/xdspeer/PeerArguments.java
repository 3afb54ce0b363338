package org.pacsflow.xdspeer;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The command line: a mode word, then {@code --name value} or {@code --name=value} options
 * (a name may repeat). The server mode hands its options to Spring Boot as properties.
 */
record PeerArguments(String mode, Map<String, List<String>> options) {

    static final List<String> CLIENT_MODES = List.of("consume", "submit");

    static PeerArguments parse(String[] args) {
        String mode = "serve";
        int i = 0;
        if (args.length > 0 && !args[0].startsWith("-")) {
            mode = args[0];
            i = 1;
        }
        Map<String, List<String>> options = new LinkedHashMap<>();
        for (; i < args.length; i++) {
            String arg = args[i];
            if (!arg.startsWith("--")) {
                throw new IllegalArgumentException("expected --option, got: " + arg);
            }
            String name = arg.substring(2);
            String value;
            int eq = name.indexOf('=');
            if (eq >= 0) {
                value = name.substring(eq + 1);
                name = name.substring(0, eq);
            } else if (i + 1 < args.length && !args[i + 1].startsWith("--")) {
                value = args[++i];
            } else {
                value = "true";  // a flag
            }
            options.computeIfAbsent(name, k -> new ArrayList<>()).add(value);
        }
        return new PeerArguments(mode, options);
    }

    boolean isClient() {
        return CLIENT_MODES.contains(mode);
    }

    String get(String name, String fallback) {
        List<String> values = options.get(name);
        return values == null || values.isEmpty() ? fallback : values.get(values.size() - 1);
    }

    String require(String name) {
        String value = get(name, null);
        if (value == null || value.isBlank()) {
            throw new IllegalArgumentException("missing --" + name);
        }
        return value;
    }

    List<String> all(String name) {
        return options.getOrDefault(name, List.of());
    }

    boolean flag(String name) {
        return "true".equals(get(name, "false"));
    }

    /** Spring Boot's form of the options; {@code --port N} is short for {@code --server.port=N}. */
    String[] springArgs() {
        List<String> out = new ArrayList<>();
        options.forEach((name, values) -> {
            String key = name.equals("port") ? "server.port" : name;
            values.forEach(v -> out.add("--" + key + "=" + v));
        });
        return out.toArray(String[]::new);
    }
}
