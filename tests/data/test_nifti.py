"""NIfTI volumes -> the DICOM display layout (LPS), in HU."""

from __future__ import annotations

import numpy as np
import pytest

from sparkct.data.nifti import is_nifti, nifti_stem, read_nifti

nib = pytest.importorskip("nibabel")


def test_orientation_and_spacing(tmp_path):
    # a RAS volume with markers at known anatomical sides
    vol = np.full((10, 12, 5), -1000, np.int16)  # voxel axes along x, y, z (RAS)
    vol[9, 6, 2] = 100  # largest x
    vol[5, 11, 2] = 200  # largest y = most anterior
    vol[5, 6, 4] = 300  # largest z = most superior
    aff = np.diag([0.7, 0.8, 2.0, 1.0])
    aff[:3, 3] = [-10, -20, -30]
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "v.nii.gz"))
    v = read_nifti(str(tmp_path / "v.nii.gz"))
    assert v.shape == (5, 12, 10) and v.spacing == pytest.approx((2.0, 0.8, 0.7))
    # each marker lands on the voxel whose LPS position (from the volume's affine) equals the
    # marker's position in the file (RAS affine, x and y negated)
    a = v.affine()
    for val in (100, 200, 300):
        k, i, j = np.argwhere(v.hu == val)[0]
        src = np.argwhere(vol == val)[0]
        ras = aff @ np.array([*src, 1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])
        np.testing.assert_allclose(a @ np.array([k, i, j, 1.0]), [*lps, 1.0], atol=1e-5)
    # anterior is up (row 0), superior is the last slice
    assert np.argwhere(v.hu == 200)[0][1] == 0 and np.argwhere(v.hu == 300)[0][0] == 4
    assert np.all(np.diff(v.z) > 0)


def test_reoriented_input_gives_the_same_volume(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(8, 9, 4)).astype(np.int16)
    aff = np.diag([0.7, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "ras.nii"))
    # the same anatomy stored LPS-ordered (x and y flipped)
    flipped = vol[::-1, ::-1, :]
    aff2 = aff.copy()
    aff2[0, 0], aff2[1, 1] = -0.7, -0.8
    aff2[:3, 3] = [0.7 * 7, 0.8 * 8, 0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), aff2), str(tmp_path / "lps.nii"))
    a, b = read_nifti(str(tmp_path / "ras.nii")), read_nifti(str(tmp_path / "lps.nii"))
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)


def test_helpers_and_errors(tmp_path):
    assert is_nifti("a/b.nii.gz") and is_nifti("x.NII") and not is_nifti("x.dcm")
    assert nifti_stem("a/case_1.nii.gz") == "case_1"
    (tmp_path / "bad.nii").write_bytes(b"not nifti")
    with pytest.raises(ValueError, match="NIfTI"):
        read_nifti(str(tmp_path / "bad.nii"))
    nib.save(nib.Nifti1Image(np.zeros((2, 2), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(ValueError, match="3-D"):
        read_nifti(str(tmp_path / "flat.nii"))
