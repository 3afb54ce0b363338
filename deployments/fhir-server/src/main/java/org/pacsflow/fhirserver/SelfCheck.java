package org.pacsflow.fhirserver;

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/** Two requests against our own server: the CapabilityStatement, and $validate of a minimal Patient. */
final class SelfCheck {
    private static final Logger LOG = LoggerFactory.getLogger(SelfCheck.class);
    private static final String MINIMAL_PATIENT =
            "{\"resourceType\":\"Patient\",\"active\":true,\"name\":[{\"family\":\"Check\"}]}";

    private SelfCheck() {}

    static boolean run(String baseUrl) {
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        try {
            HttpResponse<String> meta = client.send(
                    HttpRequest.newBuilder(URI.create(baseUrl + "/metadata"))
                            .header("Accept", "application/fhir+json")
                            .timeout(Duration.ofSeconds(60))
                            .GET()
                            .build(),
                    HttpResponse.BodyHandlers.ofString());
            boolean metaOk = meta.statusCode() == 200 && meta.body().contains("\"CapabilityStatement\"");
            HttpResponse<String> validate = client.send(
                    HttpRequest.newBuilder(URI.create(baseUrl + "/Patient/$validate"))
                            .header("Content-Type", "application/fhir+json")
                            .header("Accept", "application/fhir+json")
                            .timeout(Duration.ofSeconds(120))
                            .POST(HttpRequest.BodyPublishers.ofString(MINIMAL_PATIENT))
                            .build(),
                    HttpResponse.BodyHandlers.ofString());
            boolean validateOk = validate.statusCode() == 200
                    && validate.body().contains("\"OperationOutcome\"")
                    && !validate.body().contains("\"severity\":\"error\"");
            LOG.info("Self-check: metadata HTTP {} ({}), $validate HTTP {} ({})", meta.statusCode(),
                    metaOk ? "ok" : "unexpected", validate.statusCode(), validateOk ? "ok" : "unexpected");
            return metaOk && validateOk;
        } catch (IOException e) {
            LOG.error("Self-check request failed", e);
            return false;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return false;
        }
    }
}
