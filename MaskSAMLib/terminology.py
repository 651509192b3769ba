"""Standard terminology (SNOMED CT codes, as in 3D Slicer's tables) for the structures we segment.

A 3D Slicer segment carries its meaning as a terminology entry, a string of seven
``~``-separated fields (``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``)::

    context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier

where each code is ``CodingSchemeDesignator^CodeValue^CodeMeaning`` (``^^`` when empty).
Slicer finds an entry in its terminology tables by the context name and the codes, and
``.seg.nrrd`` files and DICOM SEG carry the same codes, so a segment named ``liver`` by one
tool is the liver for every other.

The codes below are those of Slicer's own tables (checked against Slicer 5.10.0 and its main
branch, ``Modules/Loadable/Terminologies/Resources/``): the "3D Slicer General Anatomy list"
where it has the structure, else the "DICOM master list". The meanings are spelled exactly as
there (``Bladder``, ``Small Intestine``, ``Left Ventricle``), since Slicer compares them.
The left ventricle myocardium, the one structure in neither table, is the SNOMED CT type
"Myocardium" (74281007) with the anatomic region "Left Ventricle" (87878005) from Slicer's
"Anatomic codes - DICOM master list".

Pure Python: no torch, no Qt, no Slicer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MaskSAMError

GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """One coded concept: ``SCT^10200004^Liver``."""

    scheme: str
    value: str
    meaning: str

    def serialize(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> Code | None:
        """``"SCT^10200004^Liver"`` -> Code; ``"^^"`` (or an empty field) -> None."""
        parts = text.split("^")
        if len(parts) != 3:
            raise MaskSAMError(f"'{text}' is not a code 'SCHEME^VALUE^MEANING'.")
        if not any(parts):
            return None
        return cls(*parts)


def _serialize(code: Code | None) -> str:
    return code.serialize() if code is not None else "^^"


@dataclass(frozen=True)
class TerminologyEntry:
    """A Slicer terminology entry (see the module docstring for the string form)."""

    context: str
    category: Code
    type: Code
    type_modifier: Code | None = None
    anatomic_context: str = ANATOMIC_CONTEXT
    region: Code | None = None
    region_modifier: Code | None = None

    def serialize(self) -> str:
        return "~".join([
            self.context, self.category.serialize(), self.type.serialize(),
            _serialize(self.type_modifier), self.anatomic_context, _serialize(self.region),
            _serialize(self.region_modifier),
        ])

    @classmethod
    def parse(cls, text: str) -> TerminologyEntry:
        """The inverse of :meth:`serialize`; a one-line error for anything else."""
        fields = str(text).split("~")
        if len(fields) != 7:
            raise MaskSAMError(
                f"'{text}' is not a Slicer terminology entry (7 fields separated by '~')."
            )
        category, kind = Code.parse(fields[1]), Code.parse(fields[2])
        if category is None or kind is None:
            raise MaskSAMError(f"'{text}' has no category or type code.")
        return cls(
            context=fields[0], category=category, type=kind,
            type_modifier=Code.parse(fields[3]), anatomic_context=fields[4],
            region=Code.parse(fields[5]), region_modifier=Code.parse(fields[6]),
        )


TISSUE = Code("SCT", "85756007", "Tissue")
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
LEFT = Code("SCT", "7771000", "Left")
RIGHT = Code("SCT", "24028007", "Right")


def _anatomy(value: str, meaning: str, modifier: Code | None = None,
             context: str = GENERAL_ANATOMY) -> TerminologyEntry:
    return TerminologyEntry(context, ANATOMICAL_STRUCTURE, Code("SCT", value, meaning), modifier)


#: Class name (normalised: lower case, words joined by "_") -> terminology entry.
STRUCTURES: dict[str, TerminologyEntry] = {
    # Abdomen and thorax (the organs MaskSAMLib.config knows colours for)
    "liver": _anatomy("10200004", "Liver"),
    "spleen": _anatomy("78961009", "Spleen"),
    "kidney": _anatomy("64033007", "Kidney"),
    "kidney_left": _anatomy("64033007", "Kidney", LEFT),
    "kidney_right": _anatomy("64033007", "Kidney", RIGHT),
    "stomach": _anatomy("69695003", "Stomach"),
    "aorta": _anatomy("15825003", "Aorta"),
    "pancreas": _anatomy("15776009", "Pancreas"),
    "gallbladder": _anatomy("28231008", "Gallbladder"),
    "inferior_vena_cava": _anatomy("64131007", "Inferior vena cava", context=DICOM_MASTER),
    "esophagus": _anatomy("32849002", "Esophagus"),
    "heart": _anatomy("80891009", "Heart"),
    "urinary_bladder": _anatomy("89837001", "Bladder"),
    "lung": _anatomy("39607008", "Lung"),
    "lung_left": _anatomy("39607008", "Lung", LEFT),
    "lung_right": _anatomy("39607008", "Lung", RIGHT),
    "duodenum": _anatomy("38848004", "Duodenum"),
    "small_bowel": _anatomy("30315005", "Small Intestine"),
    "colon": _anatomy("71854001", "Colon"),
    "prostate": _anatomy("41216001", "Prostate"),
    "bone": TerminologyEntry(GENERAL_ANATOMY, TISSUE, Code("SCT", "272673000", "Bone")),
    "vertebra": _anatomy("51282000", "Vertebra", context=DICOM_MASTER),
    "spine": _anatomy("421060004", "Spine", context=DICOM_MASTER),
    # Heart (cine MR, ACDC-style labels: right ventricle cavity, myocardium, left ventricle)
    "right_ventricle": _anatomy("53085002", "Right Ventricle"),
    "left_ventricle": _anatomy("87878005", "Left Ventricle"),
    "myocardium": TerminologyEntry(
        DICOM_MASTER, ANATOMICAL_STRUCTURE, Code("SCT", "74281007", "Myocardium"),
        region=Code("SCT", "87878005", "Left Ventricle"),
    ),
}

#: Other spellings of the same structures (normalised form -> key of STRUCTURES).
ALIASES: dict[str, str] = {
    "left_kidney": "kidney_left", "right_kidney": "kidney_right",
    "kidney_l": "kidney_left", "kidney_r": "kidney_right",
    "left_lung": "lung_left", "right_lung": "lung_right",
    "gall_bladder": "gallbladder", "bladder": "urinary_bladder",
    "ivc": "inferior_vena_cava", "postcava": "inferior_vena_cava",
    "oesophagus": "esophagus", "small_intestine": "small_bowel",
    "vertebral_column": "spine",
    "rv": "right_ventricle", "right_ventricle_cavity": "right_ventricle",
    "lv": "left_ventricle", "left_ventricle_cavity": "left_ventricle",
    "myo": "myocardium", "lv_myocardium": "myocardium",
    "left_ventricle_myocardium": "myocardium", "left_ventricular_myocardium": "myocardium",
    "myocardium_of_left_ventricle": "myocardium",
}


def normalize_name(name: str) -> str:
    """``"Kidney Left"``, ``"kidney-left"`` and ``"kidney_left"`` -> ``"kidney_left"``."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def terminology_entry(name: str) -> TerminologyEntry | None:
    """The standard entry for a class name, or None for a structure this table does not know."""
    key = normalize_name(name)
    return STRUCTURES.get(ALIASES.get(key, key))


def terminology_for(name: str) -> str | None:
    """The Slicer terminology string for a class name (None when unknown)."""
    entry = terminology_entry(name)
    return entry.serialize() if entry is not None else None
