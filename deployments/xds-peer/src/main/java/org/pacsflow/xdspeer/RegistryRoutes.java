package org.pacsflow.xdspeer;

import jakarta.activation.DataHandler;
import org.apache.camel.Exchange;
import org.apache.camel.Processor;
import org.apache.camel.builder.RouteBuilder;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.DocumentEntry;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.ObjectReference;
import org.openehealth.ipf.commons.ihe.xds.core.requests.DocumentReference;
import org.openehealth.ipf.commons.ihe.xds.core.requests.ProvideAndRegisterDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.QueryRegistry;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveImagingDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.query.FindDocumentsQuery;
import org.openehealth.ipf.commons.ihe.xds.core.requests.query.GetDocumentsQuery;
import org.openehealth.ipf.commons.ihe.xds.core.requests.query.QueryReturnType;
import org.openehealth.ipf.commons.ihe.xds.core.responses.ErrorCode;
import org.openehealth.ipf.commons.ihe.xds.core.responses.ErrorInfo;
import org.openehealth.ipf.commons.ihe.xds.core.responses.QueryResponse;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Response;
import org.openehealth.ipf.commons.ihe.xds.core.responses.RetrievedDocument;
import org.openehealth.ipf.commons.ihe.xds.core.responses.RetrievedDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Severity;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Status;
import org.openehealth.ipf.commons.ihe.xds.core.validate.ValidationMessage;
import org.openehealth.ipf.commons.ihe.xds.core.validate.XDSMetaDataException;

import java.util.List;

import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.iti18RequestValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.iti18ResponseValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.iti41RequestValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.iti41ResponseValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.iti43RequestValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.iti43ResponseValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.rad69RequestValidator;
import static org.openehealth.ipf.platform.camel.ihe.xds.XdsCamelValidators.rad69ResponseValidator;

/**
 * The Document Registry and Repository actors (ITI-41 in, ITI-18 and ITI-43 out) and the stand-in
 * RAD-69 source, each request and response checked by IPF's validators. A failed check or a refused submission becomes an ebXML
 * error in the response (IPF maps an XDSMetaDataException to its XDS error code).
 */
public class RegistryRoutes extends RouteBuilder {

    private final DocumentStore store;
    private final ImagingSource imagingSource;

    public RegistryRoutes(DocumentStore store, ImagingSource imagingSource) {
        this.store = store;
        this.imagingSource = imagingSource;
    }

    @Override
    public void configure() {
        errorHandler(noErrorHandler());
        route("xds-iti41:xds-iti41", iti41RequestValidator(), ProvideAndRegisterDocumentSet.class,
                this::provide, iti41ResponseValidator());
        route("xds-iti18:xds-iti18", iti18RequestValidator(), QueryRegistry.class,
                this::query, iti18ResponseValidator());
        route("xds-iti43:xds-iti43", iti43RequestValidator(), RetrieveDocumentSet.class,
                this::retrieve, iti43ResponseValidator());
        route("xdsi-rad69:xdsi-rad69", rad69RequestValidator(), RetrieveImagingDocumentSet.class,
                imagingSource::retrieve, rad69ResponseValidator());
    }

    /** One web service: IPF's request check, the body as IPF's model, the handler, IPF's response check. */
    private void route(String uri, Processor requestValidator, Class<?> requestType, Processor handler,
                       Processor responseValidator) {
        from(uri).routeId(uri.substring(0, uri.indexOf(':')))
                .process(requestValidator)
                .convertBodyTo(requestType)
                .process(handler)
                .process(responseValidator);
    }

    private void provide(Exchange exchange) {
        store.provide(exchange.getIn().getBody(ProvideAndRegisterDocumentSet.class));
        exchange.getMessage().setBody(new Response(Status.SUCCESS));
    }

    private void query(Exchange exchange) {
        QueryRegistry request = exchange.getIn().getBody(QueryRegistry.class);
        List<DocumentEntry> entries;
        if (request.getQuery() instanceof FindDocumentsQuery find) {
            entries = store.find(find.getPatientId(), find.getStatus(), find.getFormatCodes());
        } else if (request.getQuery() instanceof GetDocumentsQuery get) {
            entries = store.get(get.getUniqueIds(), get.getUuids());
        } else {
            throw new XDSMetaDataException(ValidationMessage.UNKNOWN_QUERY_TYPE, request.getQuery().getType());
        }
        QueryResponse response = new QueryResponse(Status.SUCCESS);
        if (request.getReturnType() == QueryReturnType.OBJECT_REF) {
            entries.forEach(e -> response.getReferences().add(new ObjectReference(e.getEntryUuid())));
        } else {
            response.getDocumentEntries().addAll(entries);
        }
        exchange.getMessage().setBody(response);
    }

    private void retrieve(Exchange exchange) {
        RetrieveDocumentSet request = exchange.getIn().getBody(RetrieveDocumentSet.class);
        RetrievedDocumentSet response = new RetrievedDocumentSet(Status.SUCCESS);
        for (DocumentReference ref : request.getDocuments()) {
            var stored = store.retrieve(ref.getRepositoryUniqueId(), ref.getDocumentUniqueId());
            if (stored.isEmpty()) {
                response.getErrors().add(new ErrorInfo(ErrorCode.MISSING_DOCUMENT,
                        "unknown document " + ref.getDocumentUniqueId(), Severity.ERROR, ref.getDocumentUniqueId(), null));
                continue;
            }
            RetrievedDocument doc = new RetrievedDocument();
            doc.setRequestData(ref);
            doc.setMimeType(stored.get().entry().getMimeType());
            doc.setDataHandler(new DataHandler(new BytesDataSource(stored.get().content(), doc.getMimeType())));
            response.getDocuments().add(doc);
        }
        if (!response.getErrors().isEmpty()) {
            response.setStatus(response.getDocuments().isEmpty() ? Status.FAILURE : Status.PARTIAL_SUCCESS);
        }
        exchange.getMessage().setBody(response);
    }
}
