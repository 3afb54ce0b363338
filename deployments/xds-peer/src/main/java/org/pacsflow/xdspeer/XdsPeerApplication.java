package org.pacsflow.xdspeer;

import org.apache.camel.CamelContext;
import org.apache.camel.impl.DefaultCamelContext;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import ch.qos.logback.classic.Level;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Bean;

import java.nio.file.Path;

/**
 * pacsflow's XDS.b test peer.
 *
 * <pre>
 *   java -jar pacsflow-xds-peer.jar [serve] [--port N] [--xds-peer.assigning-authority OID] ...
 *   java -jar pacsflow-xds-peer.jar submit  --url ITI41_URL --patient-id CX --file F --unique-id UID --out DIR ...
 *   java -jar pacsflow-xds-peer.jar consume --registry-url URL --repository-url URL --patient-id CX --out DIR ...
 * </pre>
 *
 * {@code serve} runs the registry/repository until stopped; {@code submit} and {@code consume}
 * (see {@link XdsClient}) run IPF producers once, write what they got to {@code --out} and exit:
 * 0 when every transaction answered Success, 2 when one answered with errors, 1 when one failed
 * to run (bad arguments, no connection).
 */
@SpringBootApplication
public class XdsPeerApplication {

    public static void main(String[] args) throws Exception {
        PeerArguments arguments;
        try {
            arguments = PeerArguments.parse(args);
        } catch (IllegalArgumentException e) {
            System.err.println("xds-peer: " + e.getMessage());
            System.exit(1);
            return;
        }
        if (!arguments.isClient()) {
            if (!arguments.mode().equals("serve")) {
                System.err.println("xds-peer: unknown mode '" + arguments.mode() + "' (serve, submit or consume)");
                System.exit(1);
            }
            SpringApplication.run(XdsPeerApplication.class, arguments.springArgs());
            return;
        }
        // A client run needs no Spring: a bare Camel context finds IPF's components and type
        // converters on the class path, and starts in a fraction of the time. The summary file is
        // the output; the console gets warnings and errors only.
        ((ch.qos.logback.classic.Logger) LoggerFactory.getLogger(Logger.ROOT_LOGGER_NAME)).setLevel(Level.WARN);
        // CXF logs a failed call with its stack trace; the summary's "failure" says it in one line
        ((ch.qos.logback.classic.Logger) LoggerFactory.getLogger("org.apache.cxf")).setLevel(Level.ERROR);
        int status;
        try (CamelContext camel = new DefaultCamelContext()) {
            camel.start();
            status = new XdsClient(camel.createProducerTemplate(), arguments).run();
        }
        System.exit(status);
    }

    @Bean
    DocumentStore documentStore(@Value("${xds-peer.assigning-authority}") String assigningAuthority,
                                @Value("${xds-peer.repository-unique-id}") String repositoryUniqueId) {
        return new DocumentStore(assigningAuthority, repositoryUniqueId);
    }

    @Bean
    RegistryRoutes registryRoutes(DocumentStore store, ImagingSource imagingSource) {
        return new RegistryRoutes(store, imagingSource);
    }

    @Bean
    ImagingSource imagingSource(@Value("${xds-peer.rad69-dir:}") String dir,
                                @Value("${xds-peer.repository-unique-id}") String repositoryUniqueId) {
        return new ImagingSource(dir.isBlank() ? null : Path.of(dir), repositoryUniqueId);
    }
}
