package org.pacsflow.xdspeer;

import jakarta.activation.DataHandler;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Association;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.AssociationType;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.AvailabilityStatus;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Code;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Document;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.DocumentEntry;
import org.openehealth.ipf.commons.ihe.xds.core.metadata.Identifiable;
import org.openehealth.ipf.commons.ihe.xds.core.requests.ProvideAndRegisterDocumentSet;
import org.openehealth.ipf.commons.ihe.xds.core.validate.ValidationMessage;
import org.openehealth.ipf.commons.ihe.xds.core.validate.XDSMetaDataException;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.UUID;
import java.util.regex.Pattern;

/**
 * The registry and repository in one: document entries with their bytes, in memory.
 *
 * <p>A submission is checked whole before anything is stored, so a rejected one leaves no trace.
 * One lock for everything: this is a test peer, and the submissions it sees are few.
 */
public class DocumentStore {

    /** One stored document: its registry entry (status, hash, size filled in here) and its bytes. */
    public record Stored(DocumentEntry entry, byte[] content) {}

    private static final Pattern UUID_URN = Pattern.compile(
            "urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}");

    private final String assigningAuthority;
    private final String repositoryUniqueId;
    private final Map<String, Stored> byUuid = new LinkedHashMap<>();
    private final Map<String, Stored> byUniqueId = new HashMap<>();
    private final List<Association> associations = new ArrayList<>();

    public DocumentStore(String assigningAuthority, String repositoryUniqueId) {
        this.assigningAuthority = assigningAuthority;
        this.repositoryUniqueId = repositoryUniqueId;
    }

    public String repositoryUniqueId() {
        return repositoryUniqueId;
    }

    /** ITI-41: checks the whole submission, then stores its documents and applies RPLC. */
    public synchronized void provide(ProvideAndRegisterDocumentSet request) {
        Identifiable patient = request.getSubmissionSet().getPatientId();
        requireKnownPatient(patient);
        Map<String, String> newUuids = new HashMap<>();
        List<Stored> incoming = new ArrayList<>();
        for (Document document : request.getDocuments()) {
            incoming.add(checkDocument(document, patient, newUuids));
        }
        newUuids.put(request.getSubmissionSet().getEntryUuid(), freshUuid(request.getSubmissionSet().getEntryUuid()));
        List<Stored> replaced = new ArrayList<>();
        for (Association association : request.getAssociations()) {
            if (association.getAssociationType() == AssociationType.REPLACE) {
                replaced.add(replacedEntry(association, newUuids, patient));
            }
        }
        commit(incoming, replaced, request.getAssociations(), newUuids);
    }

    private Stored checkDocument(Document document, Identifiable patient, Map<String, String> newUuids) {
        DocumentEntry entry = document.getDocumentEntry();
        requireKnownPatient(entry.getPatientId());
        if (!patient.equals(entry.getPatientId())) {
            throw new XDSMetaDataException(ValidationMessage.DOC_ENTRY_PATIENT_ID_WRONG);
        }
        byte[] content = readAll(document.getDataHandler());
        String hash = sha1(content);
        if (entry.getHash() != null && !entry.getHash().equalsIgnoreCase(hash)) {
            throw new XDSMetaDataException(ValidationMessage.INCORRECT_HASH);
        }
        if (entry.getSize() != null && entry.getSize() != content.length) {
            throw new XDSMetaDataException(ValidationMessage.INCORRECT_SIZE);
        }
        Stored existing = byUniqueId.get(entry.getUniqueId());
        if (existing != null) {
            // a resubmission must carry the same bytes (ITI-42); we also refuse identical ones, so
            // every uniqueId names exactly one entry here
            throw existing.entry().getHash().equalsIgnoreCase(hash)
                    ? new XDSMetaDataException(ValidationMessage.UNIQUE_ID_NOT_UNIQUE, entry.getUniqueId())
                    : new XDSMetaDataException(ValidationMessage.DIFFERENT_HASH_CODE_IN_RESUBMISSION);
        }
        newUuids.put(entry.getEntryUuid(), freshUuid(entry.getEntryUuid()));
        entry.setHash(hash);
        entry.setSize((long) content.length);
        entry.setRepositoryUniqueId(repositoryUniqueId);
        entry.setAvailabilityStatus(AvailabilityStatus.APPROVED);
        return new Stored(entry, content);
    }

    private Stored replacedEntry(Association association, Map<String, String> newUuids, Identifiable patient) {
        if (!newUuids.containsKey(association.getSourceUuid())) {
            throw new XDSMetaDataException(ValidationMessage.SOURCE_UUID_NOT_FOUND);
        }
        Stored target = byUuid.get(association.getTargetUuid());
        if (target == null) {
            throw new XDSMetaDataException(ValidationMessage.UNRESOLVED_REFERENCE, association.getTargetUuid());
        }
        if (target.entry().getAvailabilityStatus() != AvailabilityStatus.APPROVED) {
            throw new XDSMetaDataException(ValidationMessage.DEPRECATED_OBJ_CANNOT_BE_TRANSFORMED);
        }
        if (!patient.equals(target.entry().getPatientId())) {
            throw new XDSMetaDataException(ValidationMessage.DOC_ENTRY_PATIENT_ID_WRONG);
        }
        return target;
    }

    private void commit(List<Stored> incoming, List<Stored> replaced, List<Association> submitted,
                        Map<String, String> newUuids) {
        for (Stored stored : incoming) {
            stored.entry().setEntryUuid(newUuids.get(stored.entry().getEntryUuid()));
            byUuid.put(stored.entry().getEntryUuid(), stored);
            byUniqueId.put(stored.entry().getUniqueId(), stored);
        }
        for (Stored old : replaced) {
            old.entry().setAvailabilityStatus(AvailabilityStatus.DEPRECATED);
        }
        for (Association association : submitted) {
            association.setEntryUuid(freshUuid(association.getEntryUuid()));
            association.setSourceUuid(newUuids.getOrDefault(association.getSourceUuid(), association.getSourceUuid()));
            association.setTargetUuid(newUuids.getOrDefault(association.getTargetUuid(), association.getTargetUuid()));
            associations.add(association);
        }
    }

    private void requireKnownPatient(Identifiable patient) {
        // The registry knows every patient of its affinity domain, and no other.
        if (patient == null || patient.getAssigningAuthority() == null
                || !assigningAuthority.equals(patient.getAssigningAuthority().getUniversalId())) {
            throw new XDSMetaDataException(ValidationMessage.UNKNOWN_PATIENT_ID);
        }
    }

    /** FindDocuments: the patient's entries whose status is one of those asked for (and format, if given). */
    public synchronized List<DocumentEntry> find(Identifiable patient, Collection<AvailabilityStatus> statuses,
                                                 Collection<Code> formatCodes) {
        List<DocumentEntry> found = new ArrayList<>();
        for (Stored stored : byUuid.values()) {
            DocumentEntry entry = stored.entry();
            boolean formatOk = formatCodes == null || formatCodes.isEmpty() || formatCodes.contains(entry.getFormatCode());
            if (patient.equals(entry.getPatientId()) && statuses.contains(entry.getAvailabilityStatus()) && formatOk) {
                found.add(entry);
            }
        }
        return found;
    }

    /** GetDocuments: entries by uniqueId or entryUUID, unknown ones left out. */
    public synchronized List<DocumentEntry> get(Collection<String> uniqueIds, Collection<String> uuids) {
        List<DocumentEntry> found = new ArrayList<>();
        for (Stored stored : byUuid.values()) {
            DocumentEntry entry = stored.entry();
            if ((uniqueIds != null && uniqueIds.contains(entry.getUniqueId()))
                    || (uuids != null && uuids.contains(entry.getEntryUuid()))) {
                found.add(entry);
            }
        }
        return found;
    }

    /** ITI-43: the bytes of one document of this repository. */
    public synchronized Optional<Stored> retrieve(String repositoryId, String uniqueId) {
        if (!repositoryUniqueId.equals(repositoryId)) {
            return Optional.empty();
        }
        return Optional.ofNullable(byUniqueId.get(uniqueId));
    }

    private String freshUuid(String submitted) {
        // symbolic ids ("Document01") get a real UUID; a client-assigned UUID is kept unless taken
        if (submitted != null && UUID_URN.matcher(submitted).matches() && !byUuid.containsKey(submitted)) {
            return submitted;
        }
        return "urn:uuid:" + UUID.randomUUID();
    }

    static byte[] readAll(DataHandler dataHandler) {
        try (InputStream in = dataHandler.getInputStream()) {
            return in.readAllBytes();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    static String sha1(byte[] content) {
        try {
            return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-1").digest(content));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }
}
