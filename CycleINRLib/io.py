"""Reading and writing volumes with SimpleITK, with the checks that keep bad input out.

A `Volume` holds the voxels as a numpy array in SimpleITK's order (k, j, i) and the
geometry in ITK's order (i, j, k): spacing, origin and a row-major 3x3 direction matrix.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
import tempfile
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError

WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")  # single-file formats: atomic rename
FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4e38
INPUT_HELP = "NIfTI, NRRD, MHA/MHD file, a DICOM series folder or any one file of a DICOM series"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # what a folder of volumes holds
SLICE_SPACING_TOLERANCE = 0.01  # relative deviation allowed between DICOM slice gaps
ORTHOGONALITY_TOLERANCE = 1e-4  # direction matrices off by more are sheared
MAX_SLICE_TILT_DEGREES = 0.5  # DICOM slices stacked further off their normal are sheared (gantry tilt)


@dataclass
class Volume:
    array: np.ndarray  # (k, j, i), as sitk.GetArrayFromImage returns it
    spacing: tuple[float, float, float]  # (i, j, k) in mm
    origin: tuple[float, float, float]  # physical position (LPS) of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 9 values, row-major, columns are the i, j, k axes

    @property
    def size(self) -> tuple[int, int, int]:
        """Voxel counts in ITK order (i, j, k)."""
        return tuple(int(n) for n in self.array.shape[::-1])

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Map continuous (i, j, k) indices (shape (..., 3)) to physical points."""
        matrix = np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing)
        return np.asarray(index, dtype=float) @ matrix.T + np.asarray(self.origin)

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction])
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing()),
            origin=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
        )


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI/NRRD/MHA file, a DICOM series folder or one file of a DICOM series (the
    series it belongs to, from its folder) as a validated 3D scalar volume."""
    path = check_name_encoding(path)
    if not path.exists():
        raise InputError(f"{path}: {'a link that loops or points to nothing' if path.is_symlink() else 'no such file or folder'}")
    if not (path.is_file() or path.is_dir()):  # ITK would wait forever for a pipe's writer, past Ctrl-C
        raise InputError(f"{path}: neither a file nor a folder (a pipe or a device); give a volume file or a DICOM folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise InputError(f"{path}: permission denied")  # SimpleITK would say it does not exist
    if path.is_dir():
        image = _read_dicom_series(path)
    elif (series := _series_of_dicom_slice(path)) is not None:
        image = _read_dicom_series(path.parent, series)
    else:
        image = _read_file(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{path}: vector/RGB image with {image.GetNumberOfComponentsPerPixel()} components; a scalar volume is needed")
    if image.GetDimension() != 3:
        raise InputError(f"{path}: {image.GetDimension()}D image; a 3D volume is needed")
    return validate_volume(Volume.from_sitk(image), str(path))


def volume_files(folder: Path) -> list[Path]:
    """The volume files of a folder, sorted; hidden ones (a partial write's `.partial-*`, macOS's
    `._*` resource files) are not volumes."""
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")
                  and path.name.lower().endswith(VOLUME_SUFFIXES))


def _read_file(path: Path) -> sitk.Image:
    with _native_stderr_captured() as native_messages:
        try:
            image = sitk.ReadImage(itk_name(path))
        except RuntimeError as error:
            image, reason = None, str(error).strip().splitlines()[-1] if str(error).strip() else "unknown format"
    if image is None:
        # MetaIO prints the real cause (a missing data file, short data) to stderr and ITK's
        # exception then names a stale errno, "No such file or directory", for a file that exists
        reason = " ".join(" ".join(native_messages).split()) or reason
        raise InputError(f"{path}: cannot be read as an image ({reason[:160]})")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path)
    return image


@contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Hold what C++ readers write straight to file descriptor 2 (past SimpleITK's warning
    switch), so that a bad file gives one line, not the reader's lines and then ours; yields a
    list that holds the captured lines once the block has ended."""
    lines: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read(4096).decode(errors="replace").splitlines())


def _check_nifti_data(path: Path) -> None:
    """ITK reads a truncated NIfTI file without complaint, filling the missing voxels with zeros,
    and turns NaN voxels of a float NIfTI file into zeros (NRRD and MetaImage readers refuse
    the first, keep the second for `validate_volume` to refuse): neither must pass for data."""
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC  # by content, as ITK reads it: a .nii.gz may be plain
        with (gzip.open if compressed else open)(path, "rb") as handle:
            layout = _nifti_layout(handle.read(540))
            if layout is None:
                return  # not a header this check understands; ITK read it, so trust ITK
            data_start, data_end, dtype = layout
            handle.seek(data_start)
            available, finite = data_start, True
            while chunk := handle.read(1 << 24):  # a multiple of every item size
                if dtype is not None and finite and available < data_end:
                    values = np.frombuffer(chunk[:min(len(chunk), data_end - available) // dtype.itemsize * dtype.itemsize], dtype)
                    finite = bool(np.isfinite(values).all())
                available += len(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: file is damaged or truncated ({error})") from None
    if available < data_end:
        raise InputError(f"{path}: file is truncated: {available} of the {data_end} bytes its header announces")
    if not finite:
        raise InputError(f"{path}: volume contains NaN or infinite voxels")


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
GZIP_MAGIC = b"\x1f\x8b"


def _nifti_layout(header: bytes) -> tuple[int, int, np.dtype | None] | None:
    """Where the voxel data of a NIfTI-1 or NIfTI-2 header begin and end, and their dtype when
    it is a float type (None otherwise); None for a header this does not understand."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            dims = struct.unpack(order + "8h", header[40:56])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 0 < dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(1, n) for n in dims[1:dims[0] + 1]], dtype=np.int64))
    start = max(offset, 348)
    dtype = np.dtype(order + NIFTI_FLOAT_TYPES[datatype]) if datatype in NIFTI_FLOAT_TYPES else None
    return start, start + voxels * bitpix // 8, dtype


def _series_of_dicom_slice(path: Path) -> str | None:
    """The Series Instance UID of a DICOM file holding one slice, None for any other file
    (a multi-frame DICOM file is a volume by itself)."""
    with _native_stderr_captured():
        if sitk.ImageFileReader.GetImageIOFromFileName(itk_name(path)) != "GDCMImageIO":
            return None
        header = sitk.ImageFileReader()
        header.SetFileName(itk_name(path))
        try:
            header.ReadImageInformation()
        except RuntimeError:
            return None  # _read_file says why
    if header.GetDimension() == 3 and header.GetSize()[2] > 1 or not header.HasMetaDataKey("0020|000e"):
        return None
    return header.GetMetaData("0020|000e").strip(" \0")


def _read_dicom_series(folder: Path, series_uid: str | None = None) -> sitk.Image:
    """The folder's only DICOM series, or the one with `series_uid`."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(itk_name(folder))
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series")
    if series_uid is None and len(series) > 1:
        raise InputError(f"{folder}: folder holds {len(series)} DICOM series: {_series_listing(reader, folder, series)}; "
                         f"give one file of the series to read as the input")
    files = reader.GetGDCMSeriesFileNames(itk_name(folder), series_uid or series[0])
    _check_dicom_slice_positions(folder, files)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: DICOM series cannot be read ({str(error).strip()[:160]})") from None


def _series_listing(reader: sitk.ImageSeriesReader, folder: Path, series: tuple[str, ...], shown: int = 6) -> str:
    """'"AXIAL 5mm" (120 files, e.g. IM0001), ...': what tells a user's series apart."""
    entries = []
    for uid in series[:shown]:
        files = reader.GetGDCMSeriesFileNames(itk_name(folder), uid)
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        header.ReadImageInformation()
        description = header.GetMetaData("0008|103e").strip() if header.HasMetaDataKey("0008|103e") else ""
        entries.append(f'"{description or uid}" ({len(files)} files, e.g. {Path(files[0]).name})')
    more = f", and {len(series) - shown} more" if len(series) > shown else ""
    return ", ".join(entries) + more


def _check_dicom_slice_positions(folder: Path, files: tuple[str, ...]) -> None:
    """Refuse series with gaps, uneven slices or a gantry tilt: one spacing and an orthogonal
    grid, which is what ITK makes of any series, would misplace their slices."""
    positions, orientation = [], None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        if not header.HasMetaDataKey("0020|0032"):
            raise InputError(f"{folder}: DICOM file {Path(name).name} has no Image Position (Patient)")
        positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
        if orientation is None and header.HasMetaDataKey("0020|0037"):
            orientation = [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
    if len(positions) < 2:
        raise InputError(f"{folder}: DICOM series has {len(positions)} slice; a volume needs several")
    steps = np.diff(np.asarray(positions), axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    if gaps.min() <= 0 or (gaps.max() - gaps.min()) > SLICE_SPACING_TOLERANCE * gaps.mean():
        raise InputError(
            f"{folder}: non-uniform slice spacing in DICOM series "
            f"({gaps.min():.3g} to {gaps.max():.3g} mm); resample it to a uniform grid first"
        )
    if orientation is not None and len(orientation) == 6:
        normal = np.cross(orientation[:3], orientation[3:])
        stacking = steps.sum(axis=0)
        tilt = np.degrees(np.arccos(min(1.0, abs(stacking @ normal) / (np.linalg.norm(stacking) * np.linalg.norm(normal)))))
        if tilt > MAX_SLICE_TILT_DEGREES:
            raise InputError(
                f"{folder}: DICOM slices are stacked {tilt:.1f} degrees off their normal (a gantry tilt), "
                f"which an orthogonal volume grid cannot hold; resample it to a regular grid first (3D Slicer's DICOM "
                f"import does, with its acquisition geometry regularization)"
            )


def validate_volume(volume: Volume, name: str) -> Volume:
    """Refuse what the model cannot treat as one 3D scalar volume."""
    array = volume.array
    if len(volume.spacing) != 3 or array.ndim != 3:
        raise InputError(f"{name}: {array.ndim}D image; a 3D volume is needed")
    if min(array.shape) < 2:
        raise InputError(f"{name}: image of size {volume.size} is 2D (a single slice); a 3D volume is needed")
    if np.iscomplexobj(array) or array.dtype == bool:
        raise InputError(f"{name}: pixel type {array.dtype} is not supported")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{name}: volume contains NaN or infinite voxels")
    if array.dtype.itemsize > 4 and np.issubdtype(array.dtype, np.floating):  # float32 and integers cannot
        largest = max(abs(float(array.min())), abs(float(array.max())))
        if largest > FLOAT32_MAX:  # the model and the metrics would make inf and NaN of it
            raise InputError(f"{name}: its values reach {largest:.3g}, beyond {FLOAT32_MAX:.3g}, the largest magnitude "
                             "of single precision, in which the model and the metrics compute; rescale the volume")
    if min(volume.spacing) <= 0:
        raise InputError(f"{name}: spacing {volume.spacing} is not positive")
    return volume


def check_name_encoding(path: str | os.PathLike) -> Path:
    """`path`, refused if it is not valid UTF-8 (a Latin-1 name on Linux): SimpleITK hands names
    to C++ as UTF-8, and such a name aborts the process there, without a word."""
    itk_name(path)
    return Path(path)


def readable(text: str) -> str:
    """`text` with the bytes of a name that Python holds escaped (an ASCII locale) written as
    the UTF-8 characters they are: for figures, which cannot draw the escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def itk_name(path: str | os.PathLike) -> str:
    """The name to give SimpleITK: the text the name's bytes hold as UTF-8. Under an ASCII
    locale (`LC_ALL=C`) Python holds "é" as two escaped bytes, which SimpleITK cannot encode."""
    try:
        return os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the name is not valid UTF-8, which ITK cannot open; rename it") from None


def check_output_path(path: str | os.PathLike, overwrite: bool, suffixes: tuple[str, ...] = WRITABLE_SUFFIXES) -> Path:
    """Refuse an output that exists (without overwrite) or is a folder, a missing or read-only
    folder, or an unknown suffix, before any work is done."""
    path = check_name_encoding(path)
    if not path.name.endswith(suffixes):  # in lower case: ITK takes .MHA for a header-and-data pair
        raise InputError(f"{path}: output must end in {' or '.join(suffixes)} (lower case)")
    check_parent_folder(path, "output folder")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output folder {path.parent} is not writable")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: output exists; pass --overwrite to replace it")
    return path


def check_output_can_hold(volume: Volume, path: str | os.PathLike) -> None:
    """Refuse a NIfTI output for sheared (non-orthogonal) directions, which NIfTI's writer would
    square up without a word, moving the slices; NRRD and MetaImage keep them."""
    if Path(path).name.endswith((".nii", ".nii.gz")):
        direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONALITY_TOLERANCE):
            raise InputError(f"{path}: NIfTI cannot hold the input's sheared (non-orthogonal) directions; "
                             f"write .nrrd or .mha")


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write atomically: nothing appears at `path` unless the whole file was written."""
    path = check_output_path(path, overwrite)
    check_output_can_hold(volume, path)
    with atomic_output(path) as temporary:
        with _native_stderr_captured() as native_messages:
            try:
                sitk.WriteImage(volume.to_sitk(), itk_name(temporary), useCompression=True)
                failed = None
            except RuntimeError as error:
                failed = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        # NIfTI's writer reports a short write (a full disk) on stderr only and returns as if it had written
        reason = next((line for line in native_messages if "ERROR" in line), failed)
        if reason:
            raise InputError(f"{path}: cannot be written ({' '.join(reason.replace(str(temporary), path.name).split())[:160]})")
    return path


def check_parent_folder(path: Path, role: str) -> None:
    """InputError unless `path`'s parent is a folder (`role` names it: "output folder")."""
    parent = resolved_folder(path.parent)
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{path}: {path.parent} is not a folder")
    if not parent.is_dir():
        raise InputError(f"{path}: {role} {path.parent} does not exist")


def resolved_folder(folder: Path) -> Path:
    """`folder` with its links followed; InputError for a link that leads back to itself."""
    try:
        return folder.resolve()
    except (RuntimeError, OSError) as error:  # Python 3.11 raises RuntimeError for a loop
        raise InputError(f"{folder}: cannot be followed ({error})") from None


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path beside `path` (same suffix), renamed to `path` only if the
    block completes; removed in every other case. The file gets the permissions of a new file
    (some writers, safetensors', create theirs readable by their owner alone)."""
    path = Path(path)
    temporary = path.with_name(partial_name(path.name))
    try:
        yield temporary
        _widen_to_new_file_mode(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_umask() -> int:
    """The process's umask, read once at import (setting it is the only way to read it, and
    another thread creating a file meanwhile would get the wrong mode)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_read_umask()


def _widen_to_new_file_mode(path: Path) -> None:
    """Add the permission bits a new file gets and `path` lacks (never remove any)."""
    mode = os.stat(path).st_mode & 0o777
    if mode & NEW_FILE_MODE != NEW_FILE_MODE:
        os.chmod(path, mode | NEW_FILE_MODE)


def partial_name(name: str) -> str:
    """A hidden, unique name for `name` while it is being written (same suffix), within the
    255 bytes a file name may have: the start of a long name gives way, not its suffix."""
    prefix = f".partial-{uuid.uuid4().hex[:8]}-"
    while len(os.fsencode(prefix + name)) > 255:  # the bytes on disk, whatever the locale
        name = name[1:]
    return prefix + name


def to_pixel_type(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast computed float intensities to a pixel type: integers are rounded and clipped to
    its range. Works in place on `values` (no volume-sized temporaries); don't reuse it."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        highest = values.dtype.type(min(info.max, np.finfo(values.dtype).max))  # float16 holds no int32 max
        if int(highest) > info.max:  # 32 bits and wider: float32 rounds the top up, past it, and the cast would wrap
            highest = np.nextafter(highest, values.dtype.type(0))
        np.rint(values, out=values)
        np.clip(values, info.min, highest, out=values)
    return values.astype(dtype, copy=False)
