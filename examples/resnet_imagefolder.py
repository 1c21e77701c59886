"""torchvision's resnet18 on an ImageFolder directory (ROOT/train/<class>/*.png, ROOT/val/<class>/*.png).

    python examples/resnet_imagefolder.py ROOT [key=value ...]
    torchrun --nproc_per_node=2 examples/resnet_imagefolder.py ROOT train.epochs=5
"""
import sys

from torchvision import datasets, models, transforms

import dtrain

root, overrides = sys.argv[1], sys.argv[2:]
tf = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
train_set = datasets.ImageFolder(f"{root}/train", tf)
val_set = datasets.ImageFolder(f"{root}/val", tf)
result = dtrain.train(model=models.resnet18(num_classes=len(train_set.classes)), train_data=train_set,
                      eval_data=val_set, overrides=["optim.lr=0.01", "train.epochs=3", "data.batch_size=16",
                                                    *overrides])
if result.is_main:
    print(f"eval accuracy {result.eval['accuracy']:.3f}")
