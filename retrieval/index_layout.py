"""The names of an index directory's files and its format version, shared by every module that
writes or reads one (`index_dir` describes the layout and what each file holds)."""

FORMAT = "tipslab-index"
FORMAT_VERSION = 2  # 2: deleted images, file sizes, tuned search; 1 still reads
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
IMAGES_FILE = "images.parquet"
VECTORS_DIR = "vectors"
IMAGES_DIR = "images"
EXPECTED = (MANIFEST, INDEX_FILE, METADATA_FILE, IMAGES_FILE, VECTORS_DIR + "/")
