package org.pacsflow.xdspeer;

import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.SerializationFeature;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.AvailabilityStatus;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Code;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.DocumentEntry;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Hl7v2Based;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.ReferenceId;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Timestamp;
import org.openehealth.ipf.commons.ihe.xds.core.responses.ErrorInfo;
import org.openehealth.ipf.commons.ihe.xds.core.responses.Status;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** What a client run got, as plain JSON a Python test can read (written whole, then renamed). */
class Summary {

    private final Map<String, Object> root = new LinkedHashMap<>();

    void put(String key, Object value) {
        root.put(key, value);
    }

    void write(Path file) throws IOException {
        Path tmp = file.resolveSibling(file.getFileName() + ".tmp");
        new ObjectMapper().enable(SerializationFeature.INDENT_OUTPUT).writeValue(tmp.toFile(), root);
        Files.move(tmp, file, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
    }

    static String status(Status status) {
        return status == null ? null : switch (status) {
            case SUCCESS -> "Success";
            case PARTIAL_SUCCESS -> "PartialSuccess";
            case FAILURE -> "Failure";
        };
    }

    static List<Map<String, Object>> errors(List<ErrorInfo> errors) {
        List<Map<String, Object>> out = new ArrayList<>();
        for (ErrorInfo e : errors) {
            Map<String, Object> item = new LinkedHashMap<>();
            item.put("errorCode", e.getErrorCode() == null ? null
                    : e.getCustomErrorCode() != null ? e.getCustomErrorCode() : e.getErrorCode().getOpcode());
            item.put("severity", e.getSeverity() == null ? null : e.getSeverity().name());
            item.put("codeContext", e.getCodeContext());
            item.put("location", e.getLocation());
            out.add(item);
        }
        return out;
    }

    static Map<String, Object> entry(DocumentEntry e) {
        Map<String, Object> item = new LinkedHashMap<>();
        item.put("entryUuid", e.getEntryUuid());
        item.put("uniqueId", e.getUniqueId());
        item.put("availabilityStatus", availability(e.getAvailabilityStatus()));
        item.put("patientId", e.getPatientId() == null ? null : Hl7v2Based.render(e.getPatientId()));
        item.put("sourcePatientId", e.getSourcePatientId() == null ? null : Hl7v2Based.render(e.getSourcePatientId()));
        item.put("mimeType", e.getMimeType());
        item.put("formatCode", code(e.getFormatCode()));
        item.put("classCode", code(e.getClassCode()));
        item.put("typeCode", code(e.getTypeCode()));
        List<Map<String, String>> events = new ArrayList<>();
        e.getEventCodeList().forEach(c -> events.add(code(c)));
        item.put("eventCodeList", events);
        List<Map<String, String>> refs = new ArrayList<>();
        for (ReferenceId r : e.getReferenceIdList()) {
            Map<String, String> ref = new LinkedHashMap<>();
            ref.put("id", r.getId());
            ref.put("idType", r.getIdTypeCode());
            ref.put("assigningAuthority", r.getAssigningAuthority() == null ? null : r.getAssigningAuthority().getUniversalId());
            ref.put("cx", Hl7v2Based.render(r));
            refs.add(ref);
        }
        item.put("referenceIdList", refs);
        item.put("repositoryUniqueId", e.getRepositoryUniqueId());
        item.put("size", e.getSize());
        item.put("hash", e.getHash());
        item.put("serviceStartTime", e.getServiceStartTime() == null ? null : Timestamp.toHL7(e.getServiceStartTime()));
        item.put("title", e.getTitle() == null ? null : e.getTitle().getValue());
        return item;
    }

    static String availability(AvailabilityStatus status) {
        return status == null ? null : status == AvailabilityStatus.APPROVED ? "Approved"
                : status == AvailabilityStatus.DEPRECATED ? "Deprecated" : status.name();
    }

    static Map<String, String> code(Code code) {
        if (code == null) {
            return null;
        }
        Map<String, String> out = new LinkedHashMap<>();
        out.put("code", code.getCode());
        out.put("scheme", code.getSchemeName());
        out.put("displayName", code.getDisplayName() == null ? null : code.getDisplayName().getValue());
        return out;
    }
}
