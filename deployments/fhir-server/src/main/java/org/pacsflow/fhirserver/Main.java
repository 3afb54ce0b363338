package org.pacsflow.fhirserver;

import ca.uhn.fhir.rest.server.RestfulServer;
import java.nio.file.Files;
import java.util.concurrent.TimeUnit;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.HttpConfiguration;
import org.eclipse.jetty.server.HttpConnectionFactory;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.util.thread.QueuedThreadPool;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Starts HAPI FHIR JPA (R4, H2) inside an embedded Jetty bound to 127.0.0.1, serving {@code /fhir}.
 *
 * <p>The Spring context is built first (database schema, DAOs, validation chain); Jetty then serves the
 * {@link RestfulServer} bean. SIGTERM (or Ctrl-C) stops Jetty and closes the context, which closes H2
 * cleanly.
 */
public final class Main {
    private static final Logger LOG = LoggerFactory.getLogger(Main.class);

    private Main() {}

    public static void main(String[] args) throws Exception {
        long t0 = System.nanoTime();
        ServerSettings settings;
        try {
            settings = ServerSettings.parse(args, System.getenv());
        } catch (ServerSettings.UsageException e) {
            if (e.getMessage() != null) {
                System.err.println("error: " + e.getMessage());
            }
            System.err.println(ServerSettings.usage());
            System.exit(e.getMessage() == null ? 0 : 2);
            return;
        }
        if (!settings.inMemory()) {
            Files.createDirectories(settings.dataDir());
        }
        LOG.info("Starting pacsflow FHIR server: {}", settings);

        AnnotationConfigApplicationContext context = new AnnotationConfigApplicationContext();
        context.registerBean(ServerSettings.class, () -> settings);
        context.register(FhirServerConfig.class);
        try {
            context.refresh();
        } catch (RuntimeException e) {
            // Spring has already destroyed what it had built; exit even if a stray thread is left.
            LOG.error("Could not build the FHIR server (Spring context)", e);
            System.exit(1);
            return;
        }
        long tSpring = System.nanoTime();
        LOG.info("Spring context ready in {} ms", TimeUnit.NANOSECONDS.toMillis(tSpring - t0));

        Server jetty = newJetty(settings, context.getBean(RestfulServer.class));
        // One hook, in order: stop serving requests, then close the DAOs and the database.
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            LOG.info("Stopping pacsflow FHIR server");
            stopQuietly(jetty);
            context.close();
            LOG.info("Stopped");
        }, "fhir-server-stop"));
        try {
            jetty.start();
        } catch (Exception e) {
            LOG.error("Could not start the HTTP server on {}:{}", ServerSettings.HOST, settings.port(), e);
            context.close();
            System.exit(1);
            return;
        }
        int port = ((ServerConnector) jetty.getConnectors()[0]).getLocalPort();
        String baseUrl = "http://" + ServerSettings.HOST + ":" + port + ServerSettings.BASE_PATH;
        LOG.info("pacsflow FHIR server ready at {} in {} ms", baseUrl,
                TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t0));
        if (settings.exitWhenReady()) {
            boolean ok = SelfCheck.run(baseUrl);
            LOG.info("Self-check {}; exiting as asked (--exit-when-ready)", ok ? "passed" : "FAILED");
            System.exit(ok ? 0 : 1); // the shutdown hook stops Jetty and closes the database
        }
        jetty.join();
    }

    private static Server newJetty(ServerSettings settings, RestfulServer restfulServer) {
        QueuedThreadPool threads = new QueuedThreadPool(32, 4);
        threads.setName("fhir-http");
        Server server = new Server(threads);

        HttpConfiguration http = new HttpConfiguration();
        http.setSendServerVersion(false);
        ServerConnector connector = new ServerConnector(server, 1, 1, new HttpConnectionFactory(http));
        connector.setHost(ServerSettings.HOST);
        connector.setPort(settings.port());
        server.addConnector(connector);

        ServletContextHandler handler = new ServletContextHandler();
        handler.setContextPath("/");
        ServletHolder holder = new ServletHolder("fhir", restfulServer);
        holder.setInitOrder(1); // initialise HAPI at start, not on the first request
        handler.addServlet(holder, ServerSettings.BASE_PATH + "/*");
        server.setHandler(handler);
        server.setStopAtShutdown(false); // our own hook stops it
        server.setStopTimeout(5_000);
        return server;
    }

    private static void stopQuietly(Server jetty) {
        try {
            jetty.stop();
        } catch (Exception e) {
            LOG.warn("Error while stopping Jetty", e);
        }
    }
}
