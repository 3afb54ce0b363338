package org.pacsflow.xdspeer;

import org.apache.camel.ProducerTemplate;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.WebApplicationType;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.ConfigurableApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Profile;

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

    public static void main(String[] args) {
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
        SpringApplication app = new SpringApplication(XdsPeerApplication.class);
        app.setWebApplicationType(WebApplicationType.NONE);
        app.setAdditionalProfiles("client");
        int status;
        try (ConfigurableApplicationContext context = app.run()) {
            XdsClient client = new XdsClient(context.getBean(ProducerTemplate.class), arguments);
            status = client.run();
        }
        System.exit(status);
    }

    @Bean
    @Profile("!client")
    DocumentStore documentStore(@Value("${xds-peer.assigning-authority}") String assigningAuthority,
                                @Value("${xds-peer.repository-unique-id}") String repositoryUniqueId) {
        return new DocumentStore(assigningAuthority, repositoryUniqueId);
    }

    @Bean
    @Profile("!client")
    RegistryRoutes registryRoutes(DocumentStore store) {
        return new RegistryRoutes(store);
    }
}
