"""Category names and ids of the standard datasets."""

# torchvision's COCO_V1 category list: index = COCO category id (1..90), 0 = background,
# "N/A" for the ids COCO does not use. Models trained by torchvision predict these ids.
COCO_CATEGORY_NAMES_91 = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
assert len(COCO_CATEGORY_NAMES_91) == 91

# The 80 COCO category ids in use, in order (contiguous label i + 1 <-> COCO_CATEGORY_IDS[i]).
COCO_CATEGORY_IDS = tuple(i for i, name in enumerate(COCO_CATEGORY_NAMES_91) if i > 0 and name != "N/A")
assert len(COCO_CATEGORY_IDS) == 80

VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
