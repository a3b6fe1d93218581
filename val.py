import sys, numpy as np, SimpleITK as sitk
from qa import resample_like
thick = sitk.ReadImage("val_thick.nii.gz"); truth_img = sitk.ReadImage("val_truth.nii.gz")
t = sitk.GetArrayFromImage(truth_img).astype(float); x = sitk.GetArrayFromImage(thick).astype(float)
outs = {"linear": sitk.GetArrayFromImage(resample_like(thick, truth_img, sitk.sitkLinear)).astype(float),
        "bspline": sitk.GetArrayFromImage(resample_like(thick, truth_img, sitk.sitkBSpline)).astype(float)}
for f in sys.argv[1:]:
    outs[f] = sitk.GetArrayFromImage(sitk.ReadImage(f)).astype(float)
r = 6; pos = np.arange(t.shape[0]) / r; lo = np.floor(pos).astype(int); hi = np.minimum(lo + 1, x.shape[0] - 1)
gen = np.arange(t.shape[0]) % r != 0
mx = np.maximum(x[lo], x[hi])
yy, xx = np.mgrid[0:t.shape[1], 0:t.shape[2]]
dist = np.minimum(np.minimum(yy, t.shape[1] - 1 - yy), np.minimum(xx, t.shape[2] - 1 - xx))
for name, v in outs.items():
    e = (v - t)[gen]
    mse = np.mean(np.clip(e, -4095, 4095) ** 2)
    psnr = 10 * np.log10(4095 ** 2 / mse)
    halluc = (v - mx > 60) & (v > 100) & (mx < 150)
    false_h = halluc & (v - t > 100)
    true_h = halluc & (v - t <= 50)
    edge = [np.abs(v - t)[gen][:, dist == k].mean() for k in (0, 1, 2, 3, 10)]
    interior = np.abs(v - t)[gen][:, dist >= 10].mean()
    # mean bias of generated slices vs truth
    print(f"{name:22s} gen PSNR {psnr:6.2f} dB  MAE {np.abs(e).mean():6.2f}  bias {e.mean():+6.2f}  "
          f"new-hyperdense vox {halluc.sum():6d} (of which truth >100 HU lower: {false_h.sum():6d}, truth within 50: {true_h.sum():6d})  "
          f"MAE at edge dist 0,1,2,3,10: {np.round(edge, 1)} interior {interior:.1f}")
# truth itself: how many voxels satisfy the 'new hyperdense' criterion in the truth (real structures between acquired slices)
th = (t - mx > 60) & (t > 100) & (mx < 150)
print("truth voxels meeting the same criterion:", th.sum())
