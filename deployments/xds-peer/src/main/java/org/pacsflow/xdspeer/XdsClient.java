package org.pacsflow.xdspeer;

import jakarta.activation.DataHandler;
import org.apache.camel.ProducerTemplate;
import org.openehealth.ipf.platform.camel.ihe.ws.AbstractWsEndpoint;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Association;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.AssociationLabel;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.AssociationType;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.AvailabilityStatus;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Code;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Document;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.DocumentEntry;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Hl7v2Based;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Identifiable;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.LocalizedString;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.ReferenceId;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.SubmissionSet;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Timestamp;
import org.openehealth.ipf.commons.ihe.xds.core.requests.DocumentReference;
import org.openehealth.ipf.commons.ihe.xds.core.requests.ProvideAndRegisterDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.QueryRegistry;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveImagingDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveSeries;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveStudy;
import org.openehealth.ipf.commons.ihe.xds.core.requests.query.FindDocumentsQuery;
import org.openehealth.ipf.commons.ihe.xds.core.requests.query.GetDocumentsQuery;
import org.openehealth.ipf.commons.ihe.xds.core.requests.query.QueryReturnType;
import org.openehealth.ipf.commons.ihe.xds.core.responses.QueryResponse;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Response;
import org.openehealth.ipf.commons.ihe.xds.core.responses.RetrievedDocument;
import org.openehealth.ipf.commons.ihe.xds.core.responses.RetrievedDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Status;

import java.io.IOException;
import java.math.BigInteger;
import java.net.URI;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;

/**
 * The peer's client side, run once from the command line with IPF producers.
 *
 * <p>{@code submit}: one ITI-41 Provide and Register Document Set-b (MTOM) of one file, as a
 * Document Source would send it (optionally replacing an entry: RPLC).
 * <p>{@code consume}: an Imaging Document Consumer independent of pacsflow's code: ITI-18
 * FindDocuments (or GetDocuments) for a patient, ITI-43 for what it found, and RAD-69 for given
 * study/series/instance UIDs. What came back is written under {@code --out}: {@code summary.json},
 * {@code documents/} and {@code rad69/}.
 */
class XdsClient {

    static final String FORMAT_KOS = "1.2.840.10008.5.1.4.1.1.88.59^^1.2.840.10008.2.6.1";
    private static final String LOINC_IMAGING = "18748-4^Diagnostic imaging study^2.16.840.1.113883.6.1";

    private final ProducerTemplate producer;
    private final PeerArguments args;
    private final Summary summary = new Summary();

    XdsClient(ProducerTemplate producer, PeerArguments args) {
        this.producer = producer;
        this.args = args;
    }

    /** Runs the mode; returns the process exit status (0 all Success, 2 an XDS error, 1 could not run). */
    int run() {
        Path out;
        try {
            out = Path.of(args.require("out"));
            Files.createDirectories(out);
        } catch (IllegalArgumentException | IOException e) {
            System.err.println("xds-peer " + args.mode() + ": " + e.getMessage());
            return 1;
        }
        summary.put("mode", args.mode());
        int status;
        try {
            status = args.mode().equals("submit") ? submit() : consume(out);
        } catch (RuntimeException e) {
            // connection refused, a SOAP fault, a bad argument: say which, keep what we have
            // the whole cause chain, briefly: the outer exception says what, the inner ones why
            StringBuilder chain = new StringBuilder();
            for (Throwable t = e; t != null; t = t.getCause() == t ? null : t.getCause()) {
                chain.append(chain.isEmpty() ? "" : " <- ").append(t.getClass().getSimpleName());
                if (t.getMessage() != null && !(t instanceof org.apache.camel.CamelExecutionException)) {
                    chain.append(": ").append(t.getMessage());
                }
            }
            String failure = chain.toString();
            summary.put("failure", failure);
            System.err.println("xds-peer " + args.mode() + ": " + failure);
            status = 1;
        }
        summary.put("exitStatus", status);
        try {
            summary.write(out.resolve("summary.json"));
        } catch (IOException e) {
            System.err.println("xds-peer: cannot write the summary: " + e.getMessage());
            return 1;
        }
        return status;
    }

    // ---------------------------------------------------------------- submit (ITI-41)

    private int submit() {
        Identifiable patient = patientId();
        byte[] content = readFile(Path.of(args.require("file")));
        String mimeType = args.get("mime-type", "application/dicom");
        DocumentEntry entry = documentEntry(patient, mimeType);
        String setUuid = "urn:uuid:" + UUID.randomUUID();

        ProvideAndRegisterDocumentSet request = new ProvideAndRegisterDocumentSet();
        request.setSubmissionSet(submissionSet(patient, setUuid));
        request.getDocuments().add(new Document(entry, new DataHandler(new BytesDataSource(content, mimeType))));
        Association member = new Association(AssociationType.HAS_MEMBER,
                "urn:uuid:" + UUID.randomUUID(), setUuid, entry.getEntryUuid());
        member.setLabel(AssociationLabel.ORIGINAL);
        request.getAssociations().add(member);
        String replaces = args.get("replaces", null);
        if (replaces != null) {
            request.getAssociations().add(new Association(AssociationType.REPLACE,
                    "urn:uuid:" + UUID.randomUUID(), entry.getEntryUuid(), replaces));
        }

        Response response = call("xds-iti41", args.require("url"), request, Response.class);
        summary.put("entryUuid", entry.getEntryUuid());
        summary.put("uniqueId", entry.getUniqueId());
        summary.put("size", content.length);
        summary.put("hash", DocumentStore.sha1(content));
        summary.put("status", Summary.status(response.getStatus()));
        summary.put("errors", Summary.errors(response.getErrors()));
        return response.getStatus() == Status.SUCCESS ? 0 : 2;
    }

    private DocumentEntry documentEntry(Identifiable patient, String mimeType) {
        DocumentEntry entry = new DocumentEntry();
        entry.setEntryUuid("urn:uuid:" + UUID.randomUUID());
        entry.setUniqueId(args.require("unique-id"));
        entry.setPatientId(patient);
        entry.setSourcePatientId(patient);
        entry.setMimeType(mimeType);
        entry.setFormatCode(code(args.get("format-code", FORMAT_KOS)));
        entry.setClassCode(code(args.get("class-code", "IMAGES^Images^1.3.6.1.4.1.19376.1.2.6.1")));
        entry.setTypeCode(code(args.get("type-code", LOINC_IMAGING)));
        entry.getConfidentialityCodes().add(code(args.get("confidentiality-code", "N^normal^2.16.840.1.113883.5.25")));
        entry.setHealthcareFacilityTypeCode(code(args.get("facility-type-code", "RADDX^Radiology diagnostics^2.16.840.1.113883.5.10588")));
        entry.setPracticeSettingCode(code(args.get("practice-setting-code", "394914008^Radiology^2.16.840.1.113883.6.96")));
        entry.setLanguageCode(args.get("language", "en-US"));
        entry.setCreationTime(Timestamp.now());
        entry.setTitle(new LocalizedString(args.get("title", "Imaging manifest")));
        String start = args.get("service-start-time", null);
        if (start != null) {
            entry.setServiceStartTime(start);
        }
        args.all("event-code").forEach(c -> entry.getEventCodeList().add(code(c)));
        args.all("reference-id").forEach(r -> entry.getReferenceIdList().add(Hl7v2Based.parse(r, ReferenceId.class)));
        return entry;
    }

    private SubmissionSet submissionSet(Identifiable patient, String uuid) {
        SubmissionSet set = new SubmissionSet();
        set.setEntryUuid(uuid);
        set.setUniqueId(args.get("submission-set-unique-id", "2.25." + new BigInteger(UUID.randomUUID().toString().replace("-", ""), 16)));
        set.setSourceId(args.get("source-id", "2.25.240815122125463532138815542375011357226"));
        set.setPatientId(patient);
        set.setSubmissionTime(Timestamp.now());
        set.setContentTypeCode(code(args.get("content-type-code", LOINC_IMAGING)));
        return set;
    }

    // ---------------------------------------------------------------- consume (ITI-18, ITI-43, RAD-69)

    private int consume(Path out) {
        boolean allSuccess = true;
        List<DocumentEntry> entries = List.of();
        if (args.get("registry-url", null) != null) {
            QueryResponse found = query();
            entries = found.getDocumentEntries();
            allSuccess = found.getStatus() == Status.SUCCESS;
        }
        if (args.get("repository-url", null) != null && !entries.isEmpty()) {
            allSuccess &= retrieveDocuments(entries, out.resolve("documents"));
        }
        if (args.get("rad69-url", null) != null) {
            allSuccess &= retrieveImages(out.resolve("rad69"));
        }
        return allSuccess ? 0 : 2;
    }

    private QueryResponse query() {
        QueryRegistry request;
        List<String> uniqueIds = args.all("unique-id");
        if (uniqueIds.isEmpty()) {
            FindDocumentsQuery find = new FindDocumentsQuery();
            find.setPatientId(patientId());
            List<AvailabilityStatus> statuses = new ArrayList<>();
            for (String s : args.all("status").isEmpty() ? List.of("Approved", "Deprecated") : args.all("status")) {
                AvailabilityStatus status = AvailabilityStatus.valueOfOpcode(s);
                if (status == null) {
                    throw new IllegalArgumentException("--status is Approved or Deprecated, got " + s);
                }
                statuses.add(status);
            }
            find.setStatus(statuses);
            request = new QueryRegistry(find);
        } else {
            GetDocumentsQuery get = new GetDocumentsQuery();
            get.setUniqueIds(uniqueIds);
            request = new QueryRegistry(get);
        }
        request.setReturnType(QueryReturnType.LEAF_CLASS);
        QueryResponse response = call("xds-iti18", args.require("registry-url"), request, QueryResponse.class);
        Map<String, Object> query = new LinkedHashMap<>();
        query.put("type", request.getQuery().getType().toString());
        query.put("status", Summary.status(response.getStatus()));
        query.put("errors", Summary.errors(response.getErrors()));
        summary.put("query", query);
        List<Map<String, Object>> documents = new ArrayList<>();
        response.getDocumentEntries().forEach(e -> documents.add(Summary.entry(e)));
        summary.put("documentEntries", documents);
        return response;
    }

    private boolean retrieveDocuments(List<DocumentEntry> entries, Path dir) {
        RetrieveDocumentSet request = new RetrieveDocumentSet();
        for (DocumentEntry e : entries) {
            request.getDocuments().add(new DocumentReference(e.getRepositoryUniqueId(), e.getUniqueId(), null));
        }
        RetrievedDocumentSet response = call("xds-iti43", args.require("repository-url"), request,
                RetrievedDocumentSet.class);
        summary.put("retrieve", saveDocuments(response, dir, ".dcm"));
        return response.getStatus() == Status.SUCCESS;
    }

    private boolean retrieveImages(Path dir) {
        String repositoryId = args.require("rad69-repository-id");
        Map<String, Map<String, List<DocumentReference>>> studies = new LinkedHashMap<>();
        for (String image : args.all("image")) {
            String[] uids = image.split("/");
            if (uids.length != 3) {
                throw new IllegalArgumentException("--image wants STUDY/SERIES/INSTANCE, got " + image);
            }
            studies.computeIfAbsent(uids[0], k -> new LinkedHashMap<>())
                    .computeIfAbsent(uids[1], k -> new ArrayList<>())
                    .add(new DocumentReference(repositoryId, uids[2], null));
        }
        RetrieveImagingDocumentSet request = new RetrieveImagingDocumentSet();
        studies.forEach((study, series) -> {
            List<RetrieveSeries> seriesList = new ArrayList<>();
            series.forEach((uid, refs) -> seriesList.add(new RetrieveSeries(uid, refs)));
            request.getRetrieveStudies().add(new RetrieveStudy(study, seriesList));
        });
        List<String> syntaxes = args.all("transfer-syntax");
        request.getTransferSyntaxIds().addAll(syntaxes.isEmpty()
                ? List.of("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") : syntaxes);
        RetrievedDocumentSet response = call("xdsi-rad69", args.require("rad69-url"), request,
                RetrievedDocumentSet.class);
        summary.put("rad69", saveDocuments(response, dir, ".dcm"));
        return response.getStatus() == Status.SUCCESS;
    }

    /** Writes each retrieved document to {@code dir/<uniqueId><suffix>}; returns its summary. */
    private Map<String, Object> saveDocuments(RetrievedDocumentSet response, Path dir, String suffix) {
        List<Map<String, Object>> files = new ArrayList<>();
        try {
            Files.createDirectories(dir);
            for (RetrievedDocument doc : response.getDocuments()) {
                String uid = doc.getRequestData().getDocumentUniqueId();
                byte[] bytes = DocumentStore.readAll(doc.getDataHandler());
                Path file = dir.resolve(uid + suffix);
                Files.write(file, bytes);
                Map<String, Object> item = new LinkedHashMap<>();
                item.put("uniqueId", uid);
                item.put("repositoryUniqueId", doc.getRequestData().getRepositoryUniqueId());
                item.put("mimeType", doc.getMimeType());
                item.put("file", file.toString());
                item.put("size", bytes.length);
                item.put("sha1", DocumentStore.sha1(bytes));
                files.add(item);
            }
        } catch (IOException e) {
            throw new java.io.UncheckedIOException(e);
        }
        Map<String, Object> result = new LinkedHashMap<>();
        result.put("status", Summary.status(response.getStatus()));
        result.put("errors", Summary.errors(response.getErrors()));
        result.put("documents", files);
        return result;
    }

    // ---------------------------------------------------------------- helpers

    /** One IPF producer call to {@code url}, with the {@code --header NAME:VALUE} HTTP headers if any. */
    private <T> T call(String component, String url, Object request, Class<T> type) {
        Map<String, String> headers = httpHeaders();
        return headers.isEmpty()
                ? producer.requestBody(endpoint(component, url), request, type)
                : producer.requestBodyAndHeader(endpoint(component, url), request,
                        AbstractWsEndpoint.OUTGOING_HTTP_HEADERS, headers, type);
    }

    /** The {@code --header} options (e.g. {@code Authorization: Bearer TOKEN}); never echoed, they may be secret. */
    private Map<String, String> httpHeaders() {
        Map<String, String> headers = new LinkedHashMap<>();
        for (String header : args.all("header")) {
            int colon = header.indexOf(':');
            if (colon <= 0) {
                throw new IllegalArgumentException("--header wants NAME:VALUE");
            }
            headers.put(header.substring(0, colon).trim(), header.substring(colon + 1).trim());
        }
        return headers;
    }

    private Identifiable patientId() {
        return Hl7v2Based.parse(args.require("patient-id"), Identifiable.class);
    }

    /** "code^scheme" or "code^display^scheme" (the display defaults to the code). */
    static Code code(String value) {
        String[] parts = value.split("\\^", -1);
        if (parts.length == 2) {
            return new Code(parts[0], new LocalizedString(parts[0]), parts[1]);
        }
        if (parts.length == 3) {
            String display = parts[1].isEmpty() ? parts[0] : parts[1];
            return new Code(parts[0], new LocalizedString(display), parts[2]);
        }
        throw new IllegalArgumentException("a code is CODE^SCHEME or CODE^DISPLAY^SCHEME, got " + value);
    }

    /** http://host:port/path -> an IPF producer URI of the given component (https: secure=true). */
    static String endpoint(String component, String url) {
        URI uri = URI.create(url);
        String scheme = uri.getScheme();
        if (!"http".equals(scheme) && !"https".equals(scheme)) {
            throw new IllegalArgumentException("not an http(s) URL: " + url);
        }
        int port = uri.getPort() != -1 ? uri.getPort() : ("https".equals(scheme) ? 443 : 80);
        // no ATNA from the client: there is no audit repository to send to
        String target = component + "://" + uri.getHost() + ":" + port + uri.getRawPath() + "?audit=false";
        return "https".equals(scheme) ? target + "&secure=true" : target;
    }

    private static byte[] readFile(Path path) {
        try {
            return Files.readAllBytes(path);
        } catch (IOException e) {
            throw new java.io.UncheckedIOException(e);
        }
    }
}
