package org.pacsflow.xdspeer;

import jakarta.activation.DataHandler;
import org.apache.camel.Exchange;
import org.openehealth.ipf.commons.ihe.xds.core.requests.DocumentReference;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveImagingDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveSeries;
import org.openehealth.ipf.commons.ihe.xds.core.requests.RetrieveStudy;
import org.openehealth.ipf.commons.ihe.xds.core.responses.ErrorCode;
import org.openehealth.ipf.commons.ihe.xds.core.responses.ErrorInfo;
import org.openehealth.ipf.commons.ihe.xds.core.responses.RetrievedDocument;
import org.openehealth.ipf.commons.ihe.xds.core.responses.RetrievedDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Severity;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Status;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.regex.Pattern;

/**
 * A stand-in Imaging Document Source for RAD-69 (route in {@link RegistryRoutes}): answers with {@code <dir>/<SOP Instance UID>.dcm}
 * unchanged. It lets the consume mode's RAD-69 producer be tested without pacsflow; pacsflow's own
 * RAD-69 endpoint is the real one. Without a folder every instance is unknown (XDSMissingDocument).
 */
public class ImagingSource {

    private static final Pattern UID = Pattern.compile("[0-9]+(\\.[0-9]+)*");

    private final Path dir;
    private final String repositoryUniqueId;

    public ImagingSource(Path dir, String repositoryUniqueId) {
        this.dir = dir;
        this.repositoryUniqueId = repositoryUniqueId;
    }

    /** RAD-69: each requested instance's file, or XDSMissingDocument. */
    void retrieve(Exchange exchange) throws IOException {
        RetrieveImagingDocumentSet request = exchange.getIn().getBody(RetrieveImagingDocumentSet.class);
        RetrievedDocumentSet response = new RetrievedDocumentSet(Status.SUCCESS);
        for (RetrieveStudy study : request.getRetrieveStudies()) {
            for (RetrieveSeries series : study.getRetrieveSerieses()) {
                for (DocumentReference ref : series.getDocuments()) {
                    Path file = fileOf(ref);
                    if (file == null) {
                        response.getErrors().add(new ErrorInfo(ErrorCode.MISSING_DOCUMENT,
                                "unknown instance " + ref.getDocumentUniqueId(), Severity.ERROR,
                                ref.getDocumentUniqueId(), null));
                        continue;
                    }
                    RetrievedDocument doc = new RetrievedDocument();
                    doc.setRequestData(ref);
                    doc.setMimeType("application/dicom");
                    doc.setDataHandler(new DataHandler(new BytesDataSource(Files.readAllBytes(file), "application/dicom")));
                    response.getDocuments().add(doc);
                }
            }
        }
        if (!response.getErrors().isEmpty()) {
            response.setStatus(response.getDocuments().isEmpty() ? Status.FAILURE : Status.PARTIAL_SUCCESS);
        }
        exchange.getMessage().setBody(response);
    }

    /** The instance's file, or null when unknown (another repository, no folder, not a UID, no file). */
    private Path fileOf(DocumentReference ref) {
        String uid = ref.getDocumentUniqueId();
        if (dir == null || !repositoryUniqueId.equals(ref.getRepositoryUniqueId()) || uid == null
                || !UID.matcher(uid).matches()) {
            return null;
        }
        Path file = dir.resolve(uid + ".dcm");
        return Files.isRegularFile(file) ? file : null;
    }
}
