"""HL7 v2 ADT messages written for the tests (fictitious people), as the bytes a sender puts on the wire."""

from __future__ import annotations

HOSPITAL_OID = "urn:oid:1.2.276.0.7230010.3.9.1"
SYSTEMS = {"HOSP": HOSPITAL_OID}

PID_FULL = (
    "PID|1||4711^^^HOSP&1.2.276.0.7230010.3.9.1&ISO^MR~X-99^^^NATID^NI||Beispiel^Anna^Maria^^Dr.^^L"
    "||19750314|F|Muster^Anni^^^^^N||Hauptstr. 1^^Berlin^^10115^DEU^H||^PRN^PH^^49^30^1234567~^NET^Internet^anna@example.org"
    "|^WPN^PH^^49^30^7654321|de^German^ISO6391|M^Married^HL70002"
)
PID_SPARSE = "PID|1||4711^^^HOSP^MR||||||||||^PRN^PH^^49^30^5555555"
PID_NULLS = 'PID|1||4711^^^HOSP^MR|||||""|||||""'  # PID-8 and PID-13: HL7 explicit null


def message(event: str, *segments: str, control: str = "MSG00001", charset: str = "", version: str = "2.5.1",
            kind: str = "ADT", sent: str = "20261130101500+0100") -> str:
    """An ADT message: MSH, EVN and the given segments, joined by carriage returns."""
    msh = f"MSH|^~\\&|HIS|HOSP|PACSFLOW|RAD|{sent}||{kind}^{event}^ADT_{event}|{control}|P|{version}"
    if charset:
        msh += f"|||||DEU|{charset}"
    return "\r".join([msh, f"EVN|{event}|20261130101400+0100", *segments]) + "\r"


def adt(event: str, pid: str = PID_FULL, *extra: str, **kwargs: str) -> bytes:
    return message(event, pid, *extra, **kwargs).encode("ascii")


A01 = adt("A01", PID_FULL, "PV1|1|I|RAD^101^1")
A04 = adt("A04", PID_FULL, "PV1|1|O", control="MSG00004")
A08_SPARSE = adt("A08", PID_SPARSE, control="MSG00008")
A08_NULLS = adt("A08", PID_NULLS, control="MSG00009")
A28 = adt("A28", PID_FULL, control="MSG00028")
A31 = adt("A31", PID_SPARSE, control="MSG00031")
A40 = adt("A40", "PID|1||4711^^^HOSP^MR||Beispiel^Anna", "MRG|0815^^^HOSP^MR", control="MSG00040")
A40_SWAPPED = adt("A40", "PID|1||0815^^^HOSP^MR||Beispiel^Anna", "MRG|4711^^^HOSP^MR", control="MSG00041")
LATIN1 = message("A01", "PID|1||4712^^^HOSP^MR||Müller^Zoë||19800101|F", charset="8859/1",
                 control="MSG00101").encode("latin-1")
UTF8 = message("A01", "PID|1||4713^^^HOSP^MR||Łukasiewicz^Jürgen Ångström||19700101|M", charset="UNICODE UTF-8",
               control="MSG00102").encode("utf-8")


def pid(**fields: str) -> str:
    """A PID segment with PID-3 = 4711 of HOSP and the given fields by number: ``pid(f8="F")``."""
    values = {3: "4711^^^HOSP^MR", **{int(k[1:]): v for k, v in fields.items()}}
    return "|".join(["PID", *(values.get(n, "") for n in range(1, max(values) + 1))])
