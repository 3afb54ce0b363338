"""``pacsflow serve``: DICOMweb over the lake (QIDO-RS, WADO-RS, STOW-RS), the study API that joins
the catalog, FHIR and storage, and the analysts' dashboard; bearer tokens with scopes."""
