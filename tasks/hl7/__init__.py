"""HL7v2 ADT messages into FHIR Patient resources: parsing, mapping, the inbox, the MLLP server."""
